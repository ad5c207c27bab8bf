//! Conversations between a server-role and a client-role instance, by
//! topic; [`harness`] wires them together.

mod harness;

mod consent;
mod lifecycle;
mod persistence;
mod redirect;
mod rejections;
mod session;
mod trust;
mod withdraw;
