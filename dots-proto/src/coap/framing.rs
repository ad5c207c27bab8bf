//! RFC 8323 message framing for CoAP over TCP/TLS and its signalling
//! messages (7.01 CSM, 7.02 Ping, 7.03 Pong, 7.04 Release, 7.05 Abort).
//!
//! A frame is `Len|TKL`, an extended length (0, 1, 2 or 4 bytes), the code,
//! the token, then options and payload exactly as in RFC 7252. There is no
//! version, type or message id. The options/payload part is produced and
//! parsed by coap-lite, so both transports share one option codec.

use coap_lite::{option_value::OptionValueU32, CoapOption, MessageClass, Packet};

use super::error::CoapError;
use super::msg::{self, Token};

/// Max-Message-Size assumed for a peer until its CSM arrives (RFC 8323 §5.3.1).
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 1152;

/// Signalling codes (class 7).
pub const CODE_CSM: u8 = 0xE1;
pub const CODE_PING: u8 = 0xE2;
pub const CODE_PONG: u8 = 0xE3;
pub const CODE_RELEASE: u8 = 0xE4;
pub const CODE_ABORT: u8 = 0xE5;

/// Signalling option numbers (RFC 8323 §5.3 - §5.6), scoped by code.
const OPT_MAX_MESSAGE_SIZE: u16 = 2;
const OPT_BLOCK_WISE: u16 = 4;
const OPT_CUSTODY: u16 = 2;
const OPT_ALTERNATIVE_ADDRESS: u16 = 2;
const OPT_HOLD_OFF: u16 = 4;
const OPT_BAD_CSM_OPTION: u16 = 2;

/// Framing errors; every one of them is a connection error (send Abort).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("message of {size} bytes exceeds Max-Message-Size {limit}")]
    TooLarge { size: u64, limit: usize },
    #[error("reserved token length {0}")]
    BadTokenLength(u8),
    #[error("invalid options: {0}")]
    Options(String),
    #[error("frame length does not match its header")]
    LengthMismatch,
    #[error("unknown signalling code 7.{0:02}")]
    UnknownSignal(u8),
    #[error("unsupported critical option {0} in CSM")]
    BadCsmOption(u16),
    #[error("no CSM from the peer within {0:?}")]
    NoCsm(std::time::Duration),
    #[error("first message is not a CSM")]
    CsmNotFirst,
}

impl From<FrameError> for CoapError {
    fn from(e: FrameError) -> Self {
        match e {
            FrameError::TooLarge { size, limit } => CoapError::TooLarge {
                size: usize::try_from(size).unwrap_or(usize::MAX),
                limit,
            },
            other => CoapError::Malformed(other.to_string()),
        }
    }
}

/// What the bytes read so far tell about the current frame.
enum Header {
    /// At least this many bytes are needed to know the frame size.
    NeedMore(usize),
    /// `header` bytes before the options; `total` bytes in the whole frame.
    Known { header: usize, total: usize },
}

fn parse_header(buf: &[u8], limit: usize) -> Result<Header, FrameError> {
    let Some(&first) = buf.first() else {
        return Ok(Header::NeedMore(1));
    };
    let (len_nibble, tkl) = (first >> 4, first & 0x0F);
    if tkl > 8 {
        return Err(FrameError::BadTokenLength(tkl));
    }
    let ext = match len_nibble {
        13 => 1,
        14 => 2,
        15 => 4,
        _ => 0,
    };
    if buf.len() < 1 + ext {
        return Ok(Header::NeedMore(1 + ext));
    }
    let ext_value = buf[1..1 + ext]
        .iter()
        .fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
    let body = match len_nibble {
        13 => ext_value + 13,
        14 => ext_value + 269,
        15 => ext_value + 65805,
        n => u64::from(n),
    };
    let header = 1 + ext + 1 + usize::from(tkl);
    let total = header as u64 + body;
    if total > limit as u64 {
        return Err(FrameError::TooLarge { size: total, limit });
    }
    // total <= limit, a usize, so the conversion is lossless.
    Ok(Header::Known {
        header,
        total: total as usize,
    })
}

/// Encodes one message (its type and message id are ignored).
pub fn encode(packet: &Packet) -> Result<Vec<u8>, CoapError> {
    msg::check_encodable(packet)?;
    let token = packet.get_token();
    let udp = packet
        .to_bytes_unlimited()
        .map_err(|e| CoapError::Encode(e.to_string()))?;
    let body = udp.get(4 + token.len()..).unwrap_or_default();
    let len = body.len();
    let mut out = Vec::with_capacity(len + token.len() + 7);
    let tkl = token.len() as u8;
    if len < 13 {
        out.push((len as u8) << 4 | tkl);
    } else if len < 269 {
        out.push(13 << 4 | tkl);
        out.push((len - 13) as u8);
    } else if len < 65805 {
        out.push(14 << 4 | tkl);
        out.extend_from_slice(&((len - 269) as u16).to_be_bytes());
    } else {
        let ext =
            u32::try_from(len - 65805).map_err(|_| CoapError::Encode("message too long".into()))?;
        out.push(15 << 4 | tkl);
        out.extend_from_slice(&ext.to_be_bytes());
    }
    out.push(u8::from(packet.header.code));
    out.extend_from_slice(token);
    out.extend_from_slice(body);
    Ok(out)
}

/// Decodes exactly one frame.
pub fn decode(frame: &[u8], limit: usize) -> Result<Packet, FrameError> {
    match parse_header(frame, limit)? {
        Header::Known { header, total } if total == frame.len() => decode_known(frame, header),
        _ => Err(FrameError::LengthMismatch),
    }
}

fn decode_known(frame: &[u8], header: usize) -> Result<Packet, FrameError> {
    let tkl = frame[0] & 0x0F;
    let code = frame[header - 1 - usize::from(tkl)];
    // Rebuild an RFC 7252 header (version 1, CON, message id 0) so coap-lite
    // parses token, options and payload the same way as for datagrams.
    let mut udp = Vec::with_capacity(frame.len() + 4);
    udp.extend_from_slice(&[0x40 | tkl, code, 0, 0]);
    udp.extend_from_slice(&frame[header - usize::from(tkl)..]);
    Packet::from_bytes(&udp).map_err(|e| FrameError::Options(e.to_string()))
}

/// Incremental decoder: accepts the byte stream in arbitrary chunks and
/// never buffers more than one frame, and never more than the limit.
#[derive(Debug, Clone)]
pub struct StreamDecoder {
    buf: Vec<u8>,
    limit: usize,
}

impl StreamDecoder {
    /// `limit`: our Max-Message-Size, in bytes of a whole frame.
    pub fn new(limit: usize) -> Self {
        StreamDecoder {
            buf: Vec::new(),
            limit,
        }
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Bytes of an incomplete frame held back.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Consumes `data` and returns the frames it completed. After an error
    /// the stream cannot be resynchronised: the connection must be aborted.
    pub fn feed(&mut self, mut data: &[u8]) -> Result<Vec<Packet>, FrameError> {
        let mut out = Vec::new();
        while !data.is_empty() {
            let header = parse_header(&self.buf, self.limit)?;
            let wanted = match header {
                Header::NeedMore(n) => n,
                Header::Known { total, .. } => total,
            };
            let take = wanted.saturating_sub(self.buf.len()).min(data.len());
            self.buf.extend_from_slice(&data[..take]);
            data = &data[take..];
            if let Header::Known { header, total } = parse_header(&self.buf, self.limit)? {
                if self.buf.len() == total {
                    let frame = std::mem::take(&mut self.buf);
                    out.push(decode_known(&frame, header)?);
                }
            }
        }
        Ok(out)
    }
}

/// A signalling message (RFC 8323 §5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Signal {
    /// 7.01 Capabilities and Settings Message.
    Csm {
        max_message_size: Option<u32>,
        block_wise: bool,
    },
    Ping {
        custody: bool,
    },
    Pong {
        custody: bool,
    },
    Release {
        alternative_address: Option<String>,
        hold_off: Option<u32>,
        diagnostic: String,
    },
    Abort {
        bad_csm_option: Option<u16>,
        diagnostic: String,
    },
}

/// True for class-7 codes.
pub fn is_signal(packet: &Packet) -> bool {
    u8::from(packet.header.code) >> 5 == 7
}

impl Signal {
    pub fn code(&self) -> u8 {
        match self {
            Signal::Csm { .. } => CODE_CSM,
            Signal::Ping { .. } => CODE_PING,
            Signal::Pong { .. } => CODE_PONG,
            Signal::Release { .. } => CODE_RELEASE,
            Signal::Abort { .. } => CODE_ABORT,
        }
    }

    /// The message carrying this signal.
    pub fn to_packet(&self, token: Token) -> Packet {
        let mut p = Packet::new();
        p.header.code = MessageClass::from(self.code());
        p.set_token(token.as_slice().to_vec());
        let uint = |p: &mut Packet, n: u16, v: u32| {
            p.add_option_as(CoapOption::from(n), OptionValueU32(v))
        };
        let flag = |p: &mut Packet, n: u16, on: bool| {
            if on {
                p.add_option(CoapOption::from(n), Vec::new())
            }
        };
        match self {
            Signal::Csm {
                max_message_size,
                block_wise,
            } => {
                if let Some(size) = max_message_size {
                    uint(&mut p, OPT_MAX_MESSAGE_SIZE, *size);
                }
                flag(&mut p, OPT_BLOCK_WISE, *block_wise);
            }
            Signal::Ping { custody } | Signal::Pong { custody } => {
                flag(&mut p, OPT_CUSTODY, *custody)
            }
            Signal::Release {
                alternative_address,
                hold_off,
                diagnostic,
            } => {
                if let Some(addr) = alternative_address {
                    p.add_option(
                        CoapOption::from(OPT_ALTERNATIVE_ADDRESS),
                        addr.clone().into_bytes(),
                    );
                }
                if let Some(secs) = hold_off {
                    uint(&mut p, OPT_HOLD_OFF, *secs);
                }
                p.payload = diagnostic.clone().into_bytes();
            }
            Signal::Abort {
                bad_csm_option,
                diagnostic,
            } => {
                if let Some(opt) = bad_csm_option {
                    uint(&mut p, OPT_BAD_CSM_OPTION, u32::from(*opt));
                }
                p.payload = diagnostic.clone().into_bytes();
            }
        }
        p
    }

    /// Reads a class-7 message. Unknown elective options are ignored.
    pub fn from_packet(packet: &Packet) -> Result<Signal, FrameError> {
        let code = u8::from(packet.header.code);
        let opt = |n: u16| packet.get_first_option(CoapOption::from(n));
        let uint = |n: u16, max: usize| opt(n).and_then(|v| msg::decode_uint(v, max));
        let diagnostic = String::from_utf8_lossy(&packet.payload).into_owned();
        Ok(match code {
            CODE_CSM => {
                let unknown_critical = packet.options().map(|(n, _)| *n).find(|n| n % 2 == 1);
                if let Some(n) = unknown_critical {
                    return Err(FrameError::BadCsmOption(n));
                }
                Signal::Csm {
                    max_message_size: uint(OPT_MAX_MESSAGE_SIZE, 4),
                    block_wise: opt(OPT_BLOCK_WISE).is_some(),
                }
            }
            CODE_PING => Signal::Ping {
                custody: opt(OPT_CUSTODY).is_some(),
            },
            CODE_PONG => Signal::Pong {
                custody: opt(OPT_CUSTODY).is_some(),
            },
            CODE_RELEASE => Signal::Release {
                alternative_address: opt(OPT_ALTERNATIVE_ADDRESS)
                    .map(|v| String::from_utf8_lossy(v).into_owned()),
                hold_off: uint(OPT_HOLD_OFF, 3),
                diagnostic,
            },
            CODE_ABORT => Signal::Abort {
                bad_csm_option: uint(OPT_BAD_CSM_OPTION, 2).map(|v| v as u16),
                diagnostic,
            },
            other => return Err(FrameError::UnknownSignal(other & 0x1F)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use coap_lite::{RequestType, ResponseType};
    use proptest::prelude::*;

    fn get_hb() -> Packet {
        let mut p = msg::request(RequestType::Get, &["hb".into()]);
        p.set_token(vec![0xAB]);
        p
    }

    #[test]
    fn encode_small_message_byte_exact() {
        // Len=3 (option header + "hb"), TKL=1, code 0.01, token AB,
        // Uri-Path (11) length 2: 0xB2 'h' 'b'.
        assert_eq!(
            encode(&get_hb()).unwrap(),
            hex::decode("3101abb26862").unwrap()
        );
        assert_eq!(
            decode(&hex::decode("3101abb26862").unwrap(), 1152).unwrap(),
            get_hb()
        );
    }

    #[test]
    fn encode_empty_ping_and_pong() {
        let ping = Signal::Ping { custody: false }.to_packet(Token::from_slice(&[]).unwrap());
        assert_eq!(encode(&ping).unwrap(), [0x00, 0xE2]);
        let pong = Signal::Pong { custody: true }.to_packet(Token::from_slice(&[7]).unwrap());
        // Len=1 (Custody option 2, empty: 0x20), TKL=1, 7.03, token 07.
        assert_eq!(encode(&pong).unwrap(), [0x11, 0xE3, 0x07, 0x20]);
    }

    #[test]
    fn csm_byte_exact() {
        let csm = Signal::Csm {
            max_message_size: Some(1152),
            block_wise: true,
        };
        let bytes = encode(&csm.to_packet(Token::from_slice(&[]).unwrap())).unwrap();
        // Max-Message-Size (2) = 0x0480 (2 bytes): 0x22 04 80;
        // Block-Wise-Transfer (4, delta 2) empty: 0x20.
        assert_eq!(bytes, [0x40, 0xE1, 0x22, 0x04, 0x80, 0x20]);
        let back = decode(&bytes, 1152).unwrap();
        assert_eq!(Signal::from_packet(&back).unwrap(), csm);
    }

    fn with_payload(len: usize) -> Packet {
        let mut p = msg::response(ResponseType::Content);
        p.set_token(vec![1, 2]);
        p.payload = vec![0x5A; len];
        p
    }

    #[test]
    fn extended_lengths_byte_exact() {
        // body = 0xFF marker + payload
        let b = encode(&with_payload(12)).unwrap(); // body 13 -> Len 13, ext 0
        assert_eq!(&b[..5], &[0xD2, 0x00, 0x45, 1, 2]);
        assert_eq!(b[5], 0xFF);
        let b = encode(&with_payload(268)).unwrap(); // body 269 -> Len 14, ext 0x0000
        assert_eq!(&b[..6], &[0xE2, 0x00, 0x00, 0x45, 1, 2]);
        let b = encode(&with_payload(267)).unwrap(); // body 268 -> Len 13, ext 255
        assert_eq!(&b[..4], &[0xD2, 0xFF, 0x45, 1]);
        let b = encode(&with_payload(65804)).unwrap(); // body 65805 -> Len 15, ext 0
        assert_eq!(&b[..7], &[0xF2, 0, 0, 0, 0, 0x45, 1]);
        assert_eq!(b.len(), 1 + 4 + 1 + 2 + 65805);
        for len in [0, 11, 12, 267, 268, 65803, 65804, 70000] {
            let p = with_payload(len);
            assert_eq!(
                decode(&encode(&p).unwrap(), usize::MAX).unwrap(),
                p,
                "{len}"
            );
        }
    }

    #[test]
    fn every_split_point() {
        let msgs = [
            get_hb(),
            with_payload(300),
            Signal::Ping { custody: false }.to_packet(Token::from_u64(9)),
        ];
        let stream: Vec<u8> = msgs.iter().flat_map(|m| encode(m).unwrap()).collect();
        for i in 0..=stream.len() {
            for j in i..=stream.len() {
                let mut d = StreamDecoder::new(2048);
                let mut got = d.feed(&stream[..i]).unwrap();
                got.extend(d.feed(&stream[i..j]).unwrap());
                got.extend(d.feed(&stream[j..]).unwrap());
                assert_eq!(got, msgs, "split at {i}/{j}");
                assert_eq!(d.buffered(), 0);
            }
        }
        // One byte at a time.
        let mut d = StreamDecoder::new(2048);
        let got: Vec<Packet> = stream.iter().flat_map(|b| d.feed(&[*b]).unwrap()).collect();
        assert_eq!(got, msgs);
    }

    #[test]
    fn oversize_rejected_from_the_header() {
        let frame = encode(&with_payload(2000)).unwrap();
        let mut d = StreamDecoder::new(1152);
        // The 3 header bytes (Len 14 + 2-byte extension) are enough to refuse.
        let err = d.feed(&frame[..3]).unwrap_err();
        assert_eq!(
            err,
            FrameError::TooLarge {
                size: frame.len() as u64,
                limit: 1152
            }
        );
        assert!(d.buffered() <= 3);
        // A 4-byte extension announcing ~4 GiB is refused without buffering.
        let mut d = StreamDecoder::new(1152);
        assert!(matches!(
            d.feed(&[0xF0, 0xFF, 0xFF, 0xFF, 0xFF]),
            Err(FrameError::TooLarge { .. })
        ));
        // Exactly the limit is fine.
        let mut d = StreamDecoder::new(frame.len());
        assert_eq!(d.feed(&frame).unwrap().len(), 1);
    }

    #[test]
    fn bad_token_length() {
        assert_eq!(
            StreamDecoder::new(100).feed(&[0x09]),
            Err(FrameError::BadTokenLength(9))
        );
    }

    #[test]
    fn signals_roundtrip() {
        let signals = [
            Signal::Csm {
                max_message_size: None,
                block_wise: false,
            },
            Signal::Csm {
                max_message_size: Some(u32::MAX),
                block_wise: false,
            },
            Signal::Ping { custody: true },
            Signal::Pong { custody: false },
            Signal::Release {
                alternative_address: Some("coaps+tcp://alt.example".into()),
                hold_off: Some(30),
                diagnostic: "bye".into(),
            },
            Signal::Abort {
                bad_csm_option: Some(9),
                diagnostic: "bad".into(),
            },
        ];
        for s in signals {
            let p = decode(
                &encode(&s.to_packet(Token::from_slice(&[1]).unwrap())).unwrap(),
                1152,
            )
            .unwrap();
            assert!(is_signal(&p));
            assert_eq!(Signal::from_packet(&p).unwrap(), s);
        }
        let mut csm = Signal::Csm {
            max_message_size: None,
            block_wise: false,
        }
        .to_packet(Token::from_slice(&[]).unwrap());
        csm.add_option(CoapOption::from(3), vec![]);
        assert_eq!(Signal::from_packet(&csm), Err(FrameError::BadCsmOption(3)));
        let mut odd = msg::response(ResponseType::Content);
        odd.header.code = MessageClass::from(0xE9);
        assert_eq!(Signal::from_packet(&odd), Err(FrameError::UnknownSignal(9)));
    }

    fn arb_packet() -> impl Strategy<Value = Packet> {
        (
            any::<u8>(),
            proptest::collection::vec(any::<u8>(), 0..=8),
            proptest::collection::vec(
                (0u16..3000, proptest::collection::vec(any::<u8>(), 0..300)),
                0..5,
            ),
            proptest::collection::vec(any::<u8>(), 0..2000),
        )
            .prop_map(|(code, token, options, payload)| {
                let mut p = Packet::new();
                p.header.code = MessageClass::from(code);
                p.set_token(token);
                for (n, v) in options {
                    p.add_option(CoapOption::from(n), v);
                }
                if code != 0 {
                    p.payload = payload;
                }
                p
            })
    }

    proptest! {
        #[test]
        fn prop_roundtrip(p in arb_packet(), chunk in 1usize..64) {
            let bytes = encode(&p).unwrap();
            prop_assert_eq!(&decode(&bytes, usize::MAX).unwrap(), &p);
            let mut d = StreamDecoder::new(1 << 20);
            let got: Vec<Packet> = bytes.chunks(chunk).flat_map(|c| d.feed(c).unwrap()).collect();
            prop_assert_eq!(got, vec![p]);
        }

        #[test]
        fn prop_arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512), chunk in 1usize..32) {
            let _ = decode(&bytes, 1152);
            let mut d = StreamDecoder::new(1152);
            for c in bytes.chunks(chunk) {
                match d.feed(c) {
                    Ok(msgs) => for m in msgs { let _ = Signal::from_packet(&m); }
                    Err(_) => break,
                }
            }
        }
    }
}
