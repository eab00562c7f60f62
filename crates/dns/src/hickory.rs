//! [`HickoryLookup`]: the production [`Lookup`], backed by `hickory-resolver`.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hickory_resolver::config::{
    ConnectionConfig, LookupIpStrategy, NameServerConfig, ResolveHosts, ResolverConfig,
};
use hickory_resolver::net::NetError;
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::{ResolverBuilder, TokioResolver};

use crate::{DnsError, Lookup};

/// Resolves A and AAAA records in parallel with hickory-resolver.
///
/// Hickory's own response cache is cleared before every lookup: [`DnsCache`](crate::DnsCache)
/// is the cache, and hickory's would otherwise keep serving a long-TTL answer past
/// [`DnsConfig::max_ttl`](crate::DnsConfig::max_ttl).
#[derive(Clone)]
pub struct HickoryLookup {
    resolver: TokioResolver,
}

impl HickoryLookup {
    /// A resolver configured like the system's: `/etc/resolv.conf` (nameservers,
    /// search domains, `ndots`, timeouts) and `/etc/hosts`, as hickory reads them.
    pub fn from_system_conf() -> Result<Self, DnsError> {
        let builder = TokioResolver::builder_tokio()
            .map_err(|error| DnsError::SystemConf(error.to_string()))?;
        Self::build(builder)
    }

    /// A resolver asking only the nameserver at `addr` (UDP, then TCP on truncation),
    /// with no search domains and without `/etc/hosts`: for tests, and for anyone
    /// pointing the proxy at a specific resolver.
    pub fn with_nameserver(addr: SocketAddr) -> Result<Self, DnsError> {
        let connections = [ConnectionConfig::udp(), ConnectionConfig::tcp()]
            .into_iter()
            .map(|mut connection| {
                connection.port = addr.port();
                connection
            })
            .collect();
        let config = ResolverConfig::from_name_servers(vec![NameServerConfig::new(
            addr.ip(),
            true,
            connections,
        )]);
        let mut builder =
            TokioResolver::builder_with_config(config, TokioRuntimeProvider::default());
        builder.options_mut().use_hosts_file = ResolveHosts::Never;
        Self::build(builder)
    }

    fn build(mut builder: ResolverBuilder<TokioRuntimeProvider>) -> Result<Self, DnsError> {
        // Both families in parallel: every A and AAAA record becomes an address.
        builder.options_mut().ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
        let resolver = builder
            .build()
            .map_err(|error| DnsError::SystemConf(error.to_string()))?;
        Ok(Self { resolver })
    }
}

impl Lookup for HickoryLookup {
    async fn lookup(&self, name: &str) -> Result<(Vec<IpAddr>, Duration), DnsError> {
        self.resolver.clear_cache();
        let lookup = self
            .resolver
            .lookup_ip(name)
            .await
            .map_err(|error| lookup_error(name, &error))?;
        let ttl = lookup
            .valid_until()
            .saturating_duration_since(std::time::Instant::now());
        Ok((lookup.iter().collect(), ttl))
    }
}

fn lookup_error(name: &str, error: &NetError) -> DnsError {
    if error.is_no_records_found() {
        DnsError::NoAddresses {
            name: name.to_owned(),
        }
    } else {
        DnsError::Resolve {
            name: name.to_owned(),
            message: error.to_string(),
        }
    }
}
