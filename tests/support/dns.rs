//! A DNS server on loopback UDP for tests: answers A/AAAA from a table the test can change
//! at any time (TTL 0 by default, for rebinding tests), NXDOMAIN for unknown names.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use hickory_resolver::proto::op::{Message, MessageType, ResponseCode};
use hickory_resolver::proto::rr::rdata::{A, AAAA};
use hickory_resolver::proto::rr::{RData, Record, RecordType};
use parking_lot::Mutex;

pub struct DnsServer {
    pub addr: SocketAddr,
    pub records: Arc<Mutex<HashMap<String, Vec<IpAddr>>>>,
    pub queries: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl DnsServer {
    pub async fn start(records: &[(&str, &[IpAddr])]) -> DnsServer {
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0")
            .await
            .expect("bind dns");
        let addr = socket.local_addr().expect("addr");
        let table: HashMap<String, Vec<IpAddr>> = records
            .iter()
            .map(|(name, ips)| {
                (
                    name.trim_end_matches('.').to_ascii_lowercase(),
                    ips.to_vec(),
                )
            })
            .collect();
        let records = Arc::new(Mutex::new(table));
        let queries = Arc::new(AtomicUsize::new(0));
        let (r, q) = (records.clone(), queries.clone());
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            loop {
                let Ok((n, peer)) = socket.recv_from(&mut buf).await else {
                    continue;
                };
                let Ok(request) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                q.fetch_add(1, Ordering::SeqCst);
                let answer = answer(&request, &r.lock());
                if let Ok(bytes) = answer.to_vec() {
                    let _ = socket.send_to(&bytes, peer).await;
                }
            }
        });
        DnsServer {
            addr,
            records,
            queries,
            task,
        }
    }

    /// Replace the answer for `name`.
    pub fn set(&self, name: &str, ips: &[IpAddr]) {
        self.records
            .lock()
            .insert(name.to_ascii_lowercase(), ips.to_vec());
    }

    pub fn nameserver(&self) -> String {
        self.addr.to_string()
    }
}

fn answer(request: &Message, table: &HashMap<String, Vec<IpAddr>>) -> Message {
    let mut response = Message::new(
        request.metadata.id,
        MessageType::Response,
        request.metadata.op_code,
    );
    response.metadata.recursion_desired = request.metadata.recursion_desired;
    response.metadata.recursion_available = true;
    response.queries = request.queries.clone();
    let Some(query) = request.queries.first() else {
        response.metadata.response_code = ResponseCode::FormErr;
        return response;
    };
    let name = query
        .name()
        .to_ascii()
        .trim_end_matches('.')
        .to_ascii_lowercase();
    match table.get(&name) {
        None => response.metadata.response_code = ResponseCode::NXDomain,
        Some(ips) => {
            for ip in ips {
                let rdata = match (ip, query.query_type()) {
                    (IpAddr::V4(v4), RecordType::A) => RData::A(A(*v4)),
                    (IpAddr::V6(v6), RecordType::AAAA) => RData::AAAA(AAAA(*v6)),
                    _ => continue,
                };
                response
                    .answers
                    .push(Record::from_rdata(query.name().clone(), 0, rdata));
            }
        }
    }
    response
}
