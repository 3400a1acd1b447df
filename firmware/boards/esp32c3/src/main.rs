//! Edgewise sensor node for ESP32-C3 boards (ESP32-C3-DevKitM-1, Seeed XIAO ESP32C3, ...): a
//! BME280 on I2C (SDA GPIO4, SCL GPIO5), Wi-Fi station with DHCP, Unix time from the gateway by
//! SNTP, and the `edgewise-firmware` core: one sample every `EDGEWISE_SAMPLE_INTERVAL_MS`, six
//! samples per SenML-CBOR message, published with MQTT QoS 1 to `sensors/{node_id}` on the
//! gateway's broker, with a 32-message offline queue.
//!
//! Configuration is compiled in from environment variables at build time (see the README):
//! `EDGEWISE_WIFI_SSID`, `EDGEWISE_WIFI_PASSWORD`, `EDGEWISE_GATEWAY` (IPv4 of the gateway: MQTT
//! broker and SNTP server), and optionally `EDGEWISE_MQTT_PORT` (1883), `EDGEWISE_NODE_ID`
//! (default `c3-{wifi mac}`), `EDGEWISE_SAMPLE_INTERVAL_MS` (10000), `EDGEWISE_MQTT_USER` and
//! `EDGEWISE_MQTT_PASSWORD`.
//!
//! Tasks: the main task samples and publishes; `wifi_task` keeps the station connected;
//! `net_task` runs the embassy-net stack. Failures of the sensor, Wi-Fi, SNTP or broker are
//! logged and retried; none of them stops the node.
#![no_std]
#![no_main]

use core::fmt::Write as _;
use core::net::Ipv4Addr;

use edgewise_firmware::bme280::{ADDRESS_PRIMARY, Bme280, Bme280Config};
use edgewise_firmware::node::NodeId;
use edgewise_firmware::sampler::{BME280_METRICS, Bme280Sensor, Polled, Sampler, Schedule};
use edgewise_firmware::sntp;
use edgewise_firmware::uplink::{Link, LinkState, Uplink, UplinkConfig};
use embassy_executor::Spawner;
use embassy_net::tcp::TcpSocket;
use embassy_net::udp::{PacketMetadata, UdpSocket};
use embassy_net::{IpEndpoint, Runner, Stack, StackResources};
use embassy_time::{Duration, Instant, Timer, with_timeout};
use esp_hal::Blocking;
use esp_hal::clock::CpuClock;
use esp_hal::delay::Delay;
use esp_hal::i2c::master::{Config as I2cConfig, I2c};
use esp_hal::rng::Rng;
use esp_hal::time::Rate;
use esp_hal::timer::timg::TimerGroup;
use esp_radio::wifi::sta::StationConfig;
use esp_radio::wifi::{
    AuthenticationMethodConfig, Config as WifiConfig, Interface, WifiController,
};
use log::{error, info, warn};
use static_cell::StaticCell;
use {esp_backtrace as _, esp_println as _};

esp_bootloader_esp_idf::esp_app_desc!();

const SSID: &str = match option_env!("EDGEWISE_WIFI_SSID") {
    Some(s) => s,
    None => "edgewise",
};
const WIFI_PASSWORD: &str = match option_env!("EDGEWISE_WIFI_PASSWORD") {
    Some(s) => s,
    None => "",
};
const GATEWAY: &str = match option_env!("EDGEWISE_GATEWAY") {
    Some(s) => s,
    None => "192.168.4.1",
};
const MQTT_PORT: Option<&str> = option_env!("EDGEWISE_MQTT_PORT");
const NODE_ID: Option<&str> = option_env!("EDGEWISE_NODE_ID");
const SAMPLE_INTERVAL_MS: Option<&str> = option_env!("EDGEWISE_SAMPLE_INTERVAL_MS");
const MQTT_USER: Option<&str> = option_env!("EDGEWISE_MQTT_USER");
const MQTT_PASSWORD: Option<&str> = option_env!("EDGEWISE_MQTT_PASSWORD");

/// Samples per MQTT message.
const SAMPLES_PER_MESSAGE: usize = 6;
/// Messages kept while the broker is unreachable (6 samples each: 32 minutes at 10 s).
const QUEUE_SLOTS: usize = 32;
/// Largest message: 6 samples x 3 metrics is about 480 bytes with a 32-byte node id.
const MESSAGE_BYTES: usize = 640;
/// A service round (connect + publish the queue) that takes longer than this is abandoned.
const SERVICE_TIMEOUT: Duration = Duration::from_secs(20);
const SNTP_RESYNC: Duration = Duration::from_secs(3_600);

type Sensor = Bme280Sensor<I2c<'static, Blocking>, Delay>;
type NodeUplink = Uplink<'static, TcpLink, QUEUE_SLOTS, MESSAGE_BYTES>;

/// The node's TCP connection to the broker, reopened on the same socket after a failure.
struct TcpLink {
    socket: TcpSocket<'static>,
    broker: IpEndpoint,
}

impl embedded_io_async::ErrorType for TcpLink {
    type Error = embassy_net::tcp::Error;
}

impl embedded_io_async::Read for TcpLink {
    async fn read(&mut self, buf: &mut [u8]) -> Result<usize, Self::Error> {
        self.socket.read(buf).await
    }
}

impl embedded_io_async::Write for TcpLink {
    async fn write(&mut self, buf: &[u8]) -> Result<usize, Self::Error> {
        self.socket.write(buf).await
    }

    async fn flush(&mut self) -> Result<(), Self::Error> {
        self.socket.flush().await
    }
}

/// Why opening the broker connection failed (logged through `Debug`).
#[derive(Debug)]
#[allow(dead_code)] // the fields are read by the derived Debug, which dead-code analysis ignores
enum OpenError {
    Connect(embassy_net::tcp::ConnectError),
    Timeout,
}

impl Link for TcpLink {
    type OpenError = OpenError;

    async fn open(&mut self) -> Result<(), OpenError> {
        // Drop whatever is left of the previous connection (RST) before reusing the socket.
        self.socket.abort();
        let _ = with_timeout(Duration::from_secs(1), self.socket.flush()).await;
        self.socket.set_timeout(Some(Duration::from_secs(90)));
        match with_timeout(Duration::from_secs(10), self.socket.connect(self.broker)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(OpenError::Connect(e)),
            Err(_) => Err(OpenError::Timeout),
        }
    }
}

/// Writes into a fixed buffer (for the node id and topic, which must live for the program).
struct Text<const N: usize> {
    buf: [u8; N],
    len: usize,
}

impl<const N: usize> Text<N> {
    const fn new() -> Self {
        Self {
            buf: [0; N],
            len: 0,
        }
    }

    fn as_str(&self) -> &str {
        core::str::from_utf8(&self.buf[..self.len]).unwrap_or("")
    }
}

impl<const N: usize> core::fmt::Write for Text<N> {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        let dst = self
            .buf
            .get_mut(self.len..self.len + s.len())
            .ok_or(core::fmt::Error)?;
        dst.copy_from_slice(s.as_bytes());
        self.len += s.len();
        Ok(())
    }
}

static NET_RESOURCES: StaticCell<StackResources<3>> = StaticCell::new();
static TCP_RX: StaticCell<[u8; 1024]> = StaticCell::new();
static TCP_TX: StaticCell<[u8; 1024]> = StaticCell::new();
static NODE_ID_TEXT: StaticCell<Text<32>> = StaticCell::new();
static TOPIC_TEXT: StaticCell<Text<48>> = StaticCell::new();
static UPLINK: StaticCell<NodeUplink> = StaticCell::new();

#[esp_rtos::main]
async fn main(spawner: Spawner) -> ! {
    esp_println::logger::init_logger(log::LevelFilter::Info);
    let peripherals = esp_hal::init(esp_hal::Config::default().with_cpu_clock(CpuClock::max()));
    // The Wi-Fi driver needs a heap; the node core does not allocate.
    esp_alloc::heap_allocator!(size: 72 * 1024);

    let timg0 = TimerGroup::new(peripherals.TIMG0);
    esp_rtos::start(timg0.timer0, peripherals.FROM_CPU_INTR0);

    let gateway: Ipv4Addr = match GATEWAY.parse() {
        Ok(ip) => ip,
        Err(_) => halt("EDGEWISE_GATEWAY is not an IPv4 address"),
    };
    let mqtt_port: u16 = parse_or(MQTT_PORT, 1883);
    let interval_ms: u32 = parse_or(SAMPLE_INTERVAL_MS, 10_000).max(1_000);

    let station = Interface::station();
    let mac = station.mac_address();
    let mut controller = match WifiController::new(peripherals.WIFI, Default::default()) {
        Ok(c) => c,
        Err(_) => halt("the Wi-Fi controller did not start"),
    };
    let (Ok(ssid), Ok(password)) = (SSID.try_into(), WIFI_PASSWORD.try_into()) else {
        halt("EDGEWISE_WIFI_SSID or EDGEWISE_WIFI_PASSWORD is too long");
    };
    let auth = if WIFI_PASSWORD.is_empty() {
        AuthenticationMethodConfig::Open
    } else {
        AuthenticationMethodConfig::Wpa2Personal(password)
    };
    let wifi_config = WifiConfig::Station(
        StationConfig::default()
            .with_ssid(ssid)
            .with_authentication(auth),
    );
    if controller.set_config(&wifi_config).is_err() {
        halt("the Wi-Fi configuration was refused");
    }

    let rng = Rng::new();
    let seed = (u64::from(rng.random()) << 32) | u64::from(rng.random());
    let (stack, runner) = embassy_net::new(
        station,
        embassy_net::Config::dhcpv4(Default::default()),
        NET_RESOURCES.init(StackResources::new()),
        seed,
    );
    spawner.spawn(wifi_task(controller).expect("one Wi-Fi task"));
    spawner.spawn(net_task(runner).expect("one network task"));

    let node_id_text = NODE_ID_TEXT.init(Text::new());
    let _ = match NODE_ID {
        Some(id) => node_id_text.write_str(id),
        None => write!(
            node_id_text,
            "c3-{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}",
            mac[0], mac[1], mac[2], mac[3], mac[4], mac[5]
        ),
    };
    let node_id_str: &'static str = node_id_text.as_str();
    let node_id = match NodeId::parse(node_id_str) {
        Ok(id) => id,
        Err(_) => halt("EDGEWISE_NODE_ID must be 1..=32 of [A-Za-z0-9._-]"),
    };
    let topic_text = TOPIC_TEXT.init(Text::new());
    let _ = write!(
        topic_text,
        "{}/{}",
        edgewise_firmware::TOPIC_PREFIX,
        node_id
    );
    let topic: &'static str = topic_text.as_str();
    info!("node {node_id}: publishing to {topic} on {gateway}:{mqtt_port} every {interval_ms} ms");

    let config = UplinkConfig {
        client_id: node_id_str,
        topic,
        keep_alive_s: 60,
        username: MQTT_USER,
        password: MQTT_PASSWORD.map(str::as_bytes),
        min_backoff_ms: 1_000,
        max_backoff_ms: 60_000,
        jitter_seed: seed,
    };
    let socket = TcpSocket::new(stack, TCP_RX.init([0; 1024]), TCP_TX.init([0; 1024]));
    let link = TcpLink {
        socket,
        broker: IpEndpoint::new(gateway.into(), mqtt_port),
    };
    let uplink = UPLINK.init(Uplink::new(config, link));

    let i2c = match I2c::new(
        peripherals.I2C0,
        I2cConfig::default().with_frequency(Rate::from_khz(100)),
    ) {
        Ok(i2c) => i2c.with_sda(peripherals.GPIO4).with_scl(peripherals.GPIO5),
        Err(_) => halt("the I2C configuration was refused"),
    };
    let mut delay = Delay::new();
    // The driver owns the bus; if the chip is missing or miswired, restarting is the retry.
    let sensor = match Bme280::new(i2c, ADDRESS_PRIMARY, Bme280Config::default(), &mut delay) {
        Ok(bme280) => Sensor { bme280, delay },
        Err(e) => {
            error!("BME280 at 0x{ADDRESS_PRIMARY:02x} (SDA GPIO4, SCL GPIO5): {e}");
            halt("no BME280")
        }
    };

    // Unix time: nothing is sampled before the first SNTP answer.
    stack.wait_config_up().await;
    let mut clock = loop {
        match sntp_time(stack, gateway).await {
            Ok(c) => break c,
            Err(e) => {
                warn!("SNTP from {gateway}: {e}; retrying in 5 s");
                Timer::after(Duration::from_secs(5)).await;
            }
        }
    };
    let mut next_resync = Instant::now() + SNTP_RESYNC;
    let first_ms = clock.unix_ms();
    // Start on the next whole interval so that nodes with the same interval line up.
    let start_ms = first_ms - first_ms.rem_euclid(i64::from(interval_ms)) + i64::from(interval_ms);
    let mut sampler = Sampler::<Sensor, 3, SAMPLES_PER_MESSAGE>::new(
        &node_id,
        BME280_METRICS,
        sensor,
        Schedule::new(start_ms, interval_ms),
    );
    let mut message = [0u8; MESSAGE_BYTES];

    loop {
        let now_ms = clock.unix_ms();
        match sampler.poll(now_ms, &mut message) {
            Ok(Polled::Message { len, seq }) => match uplink.enqueue(&message[..len]) {
                Ok(edgewise_firmware::queue::Pushed::DroppedOldest) => {
                    warn!(
                        "offline queue full: dropped the oldest message ({} so far)",
                        uplink.counters().dropped
                    )
                }
                Ok(_) => info!("message {seq}: {len} bytes queued"),
                Err(e) => error!("message {seq}: {e}"),
            },
            Ok(Polled::SensorFailed(e)) => warn!("BME280: {e}"),
            Ok(Polled::Idle | Polled::Sampled) => {}
            Err(e) => error!("encoding a message: {e}"),
        }

        if stack.is_config_up() && uplink.queued() > 0 || uplink.is_connected() {
            match with_timeout(SERVICE_TIMEOUT, uplink.service(now_ms)).await {
                Ok(LinkState::Idle) => {}
                Ok(LinkState::RetryAt(at)) => {
                    if let Some(e) = uplink.last_error() {
                        warn!(
                            "broker {gateway}:{mqtt_port}: {e}; next attempt in {} ms",
                            at - now_ms
                        );
                    }
                }
                Err(_) => warn!(
                    "publishing took over {} s; reconnecting",
                    SERVICE_TIMEOUT.as_secs()
                ),
            }
        }

        if Instant::now() >= next_resync {
            match sntp_time(stack, gateway).await {
                Ok(c) => clock = c,
                Err(e) => warn!("SNTP resync: {e}"),
            }
            next_resync = Instant::now() + SNTP_RESYNC;
        }

        let wait_ms = (sampler.schedule().next_ms() - clock.unix_ms()).clamp(10, 1_000);
        Timer::after(Duration::from_millis(wait_ms as u64)).await;
    }
}

/// Unix time = offset + uptime.
#[derive(Clone, Copy)]
struct Clock {
    offset_ms: i64,
}

impl Clock {
    fn unix_ms(&self) -> i64 {
        self.offset_ms + Instant::now().as_millis() as i64
    }
}

async fn sntp_time(stack: Stack<'static>, server: Ipv4Addr) -> Result<Clock, &'static str> {
    let mut rx_meta = [PacketMetadata::EMPTY; 2];
    let mut tx_meta = [PacketMetadata::EMPTY; 2];
    let mut rx = [0u8; 128];
    let mut tx = [0u8; 64];
    let mut socket = UdpSocket::new(stack, &mut rx_meta, &mut rx, &mut tx_meta, &mut tx);
    socket.bind(0).map_err(|_| "binding a UDP port failed")?;
    let sent_at = Instant::now();
    socket
        .send_to(&sntp::request(), IpEndpoint::new(server.into(), sntp::PORT))
        .await
        .map_err(|_| "sending the request failed")?;
    let mut reply = [0u8; 64];
    let (n, _) = match with_timeout(Duration::from_secs(2), socket.recv_from(&mut reply)).await {
        Ok(Ok(r)) => r,
        Ok(Err(_)) => return Err("receiving the reply failed"),
        Err(_) => return Err("no reply within 2 s"),
    };
    let server_ms = sntp::parse_reply(&reply[..n]).map_err(|_| "the reply is not a usable time")?;
    // Half the round trip is the best estimate of the reply's age.
    let now = Instant::now();
    let half_rtt_ms = ((now - sent_at).as_millis() / 2) as i64;
    Ok(Clock {
        offset_ms: server_ms + half_rtt_ms - now.as_millis() as i64,
    })
}

#[embassy_executor::task]
async fn wifi_task(mut controller: WifiController<'static>) {
    loop {
        match controller.connect_async().await {
            Ok(_) => {
                info!("Wi-Fi connected to {SSID}");
                let _ = controller.wait_for_disconnect_async().await;
                warn!("Wi-Fi disconnected");
            }
            Err(e) => warn!("Wi-Fi connect to {SSID}: {e:?}"),
        }
        Timer::after(Duration::from_secs(5)).await;
    }
}

#[embassy_executor::task]
async fn net_task(mut runner: Runner<'static, Interface>) {
    runner.run().await
}

fn parse_or<T: core::str::FromStr + core::fmt::Display + Copy>(
    value: Option<&str>,
    default: T,
) -> T {
    match value.map(str::parse) {
        None => default,
        Some(Ok(v)) => v,
        Some(Err(_)) => {
            warn!("bad number in the build configuration; using {default}");
            default
        }
    }
}

/// A configuration or hardware fault that no retry fixes: log it, then restart in 10 s.
fn halt(reason: &str) -> ! {
    error!("{reason}; restarting in 10 s");
    let delay = Delay::new();
    delay.delay_millis(10_000);
    esp_hal::system::software_reset()
}
