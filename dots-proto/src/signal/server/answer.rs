//! The answers the server builds: CoAP error codes for refused requests,
//! and mitigation-scope bodies.

use coap_lite::{Packet, ResponseType};

use crate::coap::{msg, ErrorResponse};
use crate::model::{DotsMessage, MitigationScope, Scope, ValidationError};
use crate::signal::action::Action;

/// The answer to one request: a response, or the error response to send.
pub(super) type Answer = Result<Packet, ErrorResponse>;

pub(super) fn bad_request(e: impl ToString) -> ErrorResponse {
    ErrorResponse::new(ResponseType::BadRequest, e.to_string())
}

pub(super) fn validation(e: ValidationError) -> ErrorResponse {
    let code = match e.coap_code() {
        (4, 22) => ResponseType::UnprocessableEntity,
        _ => ResponseType::BadRequest,
    };
    ErrorResponse::new(code, e.diagnostic())
}

pub(super) fn method_not_allowed(resource: &str) -> ErrorResponse {
    ErrorResponse::new(
        ResponseType::MethodNotAllowed,
        format!("method not allowed on {resource}"),
    )
}

pub(super) fn scopes_response(code: ResponseType, scopes: Vec<Scope>) -> Packet {
    msg::cbor_response(code, MitigationScope { scopes }.encode())
}

/// [`Action::Rejected`] for the shell's log: `e`'s code as text ("4.00")
/// with `diagnostic`.
pub(super) fn rejected(
    cuid: Option<String>,
    mid: Option<u32>,
    e: &ErrorResponse,
    diagnostic: String,
) -> Action {
    Action::Rejected {
        cuid,
        mid,
        code: coap_lite::MessageClass::Response(e.code).to_string(),
        diagnostic,
    }
}
