//! `usbip`: the USB/IP client, flag-compatible with the C usbip-utils.

use std::process::ExitCode;

use clap::{Args as ClapArgs, Parser, Subcommand};
use usbwire_cli::names;
use usbwire_proto::DeviceInfo;

#[derive(Parser, Debug)]
#[command(name = "usbip", version, about = "USB/IP client")]
struct Cli {
    /// Print debugging information.
    #[arg(short = 'd', long = "debug", global = true)]
    debug: bool,
    /// TCP port of the server.
    #[arg(short = 't', long = "tcp-port", default_value_t = 3240, global = true)]
    tcp_port: u16,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// List exportable (remote) devices.
    List(ListArgs),
}

#[derive(ClapArgs, Debug)]
struct ListArgs {
    /// List the exportable devices of a remote host.
    #[arg(short = 'r', long = "remote", value_name = "HOST")]
    remote: Option<String>,
    /// Parsable output, one device per line.
    #[arg(short = 'p', long = "parsable")]
    parsable: bool,
    /// JSON output.
    #[arg(long = "json")]
    json: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(if cli.debug { "debug" } else { "warn" })
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("usbip: error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("usbip: error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<(), String> {
    match cli.command {
        Command::List(a) => match a.remote {
            Some(host) => list_remote(&host, cli.tcp_port, a.parsable, a.json).await,
            None => Err("list: give -r HOST (listing local devices is not available yet)".into()),
        },
    }
}

fn host_port(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

async fn list_remote(host: &str, port: u16, parsable: bool, json: bool) -> Result<(), String> {
    let devices = usbwire_client::list(host_port(host, port))
        .await
        .map_err(|e| e.to_string())?;
    if json {
        println!("{}", devices_json(&devices));
        return Ok(());
    }
    if parsable {
        for d in &devices {
            let ifs: Vec<String> = d
                .interfaces
                .iter()
                .map(|i| format!("{:02x}/{:02x}/{:02x}", i.class, i.subclass, i.protocol))
                .collect();
            println!(
                "busid={}#usbid={:04x}:{:04x}#class={:02x}/{:02x}/{:02x}#speed={}#interfaces={}#",
                d.busid,
                d.id_vendor,
                d.id_product,
                d.device_class,
                d.device_subclass,
                d.device_protocol,
                d.speed.to_u32(),
                ifs.join(",")
            );
        }
        return Ok(());
    }
    if devices.is_empty() {
        return Err(format!("no exportable devices found on {host}"));
    }
    // The C tool's layout, column for column.
    println!("Exportable USB devices");
    println!("======================");
    println!(" - {host}");
    for d in &devices {
        println!(
            "{:>11}: {}",
            d.busid,
            names::product(d.id_vendor, d.id_product)
        );
        println!("{:>11}: {}", "", d.path);
        println!(
            "{:>11}: {}",
            "",
            names::class(d.device_class, d.device_subclass, d.device_protocol)
        );
        for (j, i) in d.interfaces.iter().enumerate() {
            println!(
                "{:>11}: {:>2} - {}",
                "",
                j,
                names::class(i.class, i.subclass, i.protocol)
            );
        }
        println!();
    }
    Ok(())
}

fn devices_json(devices: &[DeviceInfo]) -> String {
    let v: Vec<serde_json::Value> = devices
        .iter()
        .map(|d| {
            serde_json::json!({
                "busid": d.busid,
                "path": d.path,
                "busnum": d.busnum,
                "devnum": d.devnum,
                "speed": d.speed.describe(),
                "vendor_id": format!("{:04x}", d.id_vendor),
                "product_id": format!("{:04x}", d.id_product),
                "bcd_device": format!("{:04x}", d.bcd_device),
                "product": names::product(d.id_vendor, d.id_product),
                "class": format!("{:02x}/{:02x}/{:02x}", d.device_class, d.device_subclass, d.device_protocol),
                "configuration_value": d.configuration_value,
                "num_configurations": d.num_configurations,
                "interfaces": d.interfaces.iter().map(|i| format!("{:02x}/{:02x}/{:02x}", i.class, i.subclass, i.protocol)).collect::<Vec<_>>(),
            })
        })
        .collect();
    serde_json::Value::Array(v).to_string()
}
