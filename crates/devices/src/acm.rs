//! CDC-ACM serial (to be written).
