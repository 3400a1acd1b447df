//! The Edgewise node self-test on a Cortex-M4F (thumbv7em-none-eabihf), for QEMU's mps2-an386
//! with semihosting: runs [`edgewise_firmware::selftest`] (simulated BME280 on the real driver,
//! sampler, SenML-CBOR packs, MQTT CONNECT + QoS 1 PUBLISH over an in-memory broker), compares
//! every byte written with the expected bytes, and exits 0 only if they match.
//!
//! `cargo run --release` in this folder runs it (see `.cargo/config.toml`); CI runs it through
//! `.ci/firmware.sh`.
#![no_std]
#![no_main]

use cortex_m_rt::entry;
use cortex_m_semihosting::{debug, hprintln};
use edgewise_firmware::selftest;

#[entry]
fn main() -> ! {
    let mut wire = [0u8; 1024];
    let passed = match selftest::run(&mut wire) {
        Ok((n, report)) => {
            hprintln!(
                "selftest: {} samples, {} messages, {} payload bytes, {} bytes on the wire, first temperature {} centi-Cel",
                report.samples,
                report.messages,
                report.payload_bytes,
                report.wire_bytes,
                report.first_temperature_centi_celsius
            );
            match selftest::check(&wire[..n]) {
                Ok(()) => {
                    hprintln!("selftest: wire bytes match the expected {} bytes", n);
                    true
                }
                Err(e) => {
                    hprintln!("selftest: FAIL: {}", e);
                    false
                }
            }
        }
        Err(e) => {
            hprintln!("selftest: FAIL: {}", e);
            false
        }
    };
    if passed {
        hprintln!("selftest: PASS");
    }
    debug::exit(if passed {
        debug::EXIT_SUCCESS
    } else {
        debug::EXIT_FAILURE
    });
    loop {
        cortex_m::asm::wfi();
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    hprintln!("selftest: panic: {}", info);
    debug::exit(debug::EXIT_FAILURE);
    loop {
        cortex_m::asm::wfi();
    }
}
