//! Bosch BME280 (temperature, pressure, humidity) over I2C, generic over
//! [`embedded_hal::i2c::I2c`] and [`embedded_hal::delay::DelayNs`].
//!
//! The sensor runs in *forced mode* (the datasheet's "weather monitoring" setting, section 3.5.1):
//! each [`Bme280::measure`] writes one measurement request, waits the datasheet's maximum
//! measurement time for the configured oversampling (section 9.1), reads the eight data registers
//! in one burst and compensates them with the sensor's factory calibration. Between measurements
//! the sensor sleeps (about 0.1 µA).
//!
//! Compensation is the datasheet's integer code (section 4.2.3: 32-bit temperature and humidity,
//! 64-bit pressure), so results are bit-exact with Bosch's reference and need no FPU:
//! temperature in 0.01 °C, pressure in Pa as Q24.8, humidity in %RH as Q22.10. Invariants: a
//! [`Bme280`] only exists after the chip id was checked and the calibration read; a skipped
//! channel (raw value 0x80000 / 0x8000) is an error, never a bogus number.
//!
//! Tested below: every bus transaction with `embedded-hal-mock` (`.done()`), and the compensation
//! against the datasheet's worked example (BMP280 datasheet section 3.12, the same formulas) and
//! against the datasheet's double-precision formulas (section 8.1) over the sensor's range.

use core::fmt;

use embedded_hal::delay::DelayNs;
use embedded_hal::i2c::I2c;

/// I2C address with SDO tied to GND.
pub const ADDRESS_PRIMARY: u8 = 0x76;
/// I2C address with SDO tied to VDDIO.
pub const ADDRESS_SECONDARY: u8 = 0x77;
/// What register `0xD0` holds on a BME280 (a BMP280 answers 0x56..0x58 and has no humidity).
pub const CHIP_ID: u8 = 0x60;

mod reg {
    pub const CALIB_00: u8 = 0x88; // 0x88..=0xA1: T1..T3, P1..P9, (0xA0 reserved), H1
    pub const CHIP_ID: u8 = 0xD0;
    pub const RESET: u8 = 0xE0;
    pub const CALIB_26: u8 = 0xE1; // 0xE1..=0xE7: H2..H6
    pub const CTRL_HUM: u8 = 0xF2;
    pub const STATUS: u8 = 0xF3;
    pub const CTRL_MEAS: u8 = 0xF4;
    pub const CONFIG: u8 = 0xF5;
    pub const DATA: u8 = 0xF7; // 0xF7..=0xFE: press[3], temp[3], hum[2]
}

const RESET_COMMAND: u8 = 0xB6;
/// Status bit 0: the NVM calibration is still being copied to the image registers.
const STATUS_IM_UPDATE: u8 = 0x01;
/// Start-up time after a soft reset (datasheet table 1, t_startup).
const STARTUP_MS: u32 = 2;
/// How often `init` polls `im_update` (1 ms apart) before giving up.
const NVM_POLLS: u8 = 10;
const MODE_FORCED: u8 = 0b01;
const SKIPPED_20BIT: i32 = 0x80000;
const SKIPPED_16BIT: i32 = 0x8000;

/// Oversampling of one channel; `Skip` turns the channel off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Oversampling {
    Skip = 0,
    X1 = 1,
    X2 = 2,
    X4 = 3,
    X8 = 4,
    X16 = 5,
}

impl Oversampling {
    fn samples(self) -> u32 {
        match self {
            Self::Skip => 0,
            Self::X1 => 1,
            Self::X2 => 2,
            Self::X4 => 4,
            Self::X8 => 8,
            Self::X16 => 16,
        }
    }
}

/// IIR filter coefficient (register `config`, bits 4..2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    Off = 0,
    X2 = 1,
    X4 = 2,
    X8 = 3,
    X16 = 4,
}

/// Measurement settings. The default is the datasheet's weather-monitoring setting: x1
/// oversampling on every channel, filter off (9.3 ms per measurement at most).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bme280Config {
    pub temperature: Oversampling,
    pub pressure: Oversampling,
    pub humidity: Oversampling,
    pub filter: Filter,
}

impl Default for Bme280Config {
    fn default() -> Self {
        Self {
            temperature: Oversampling::X1,
            pressure: Oversampling::X1,
            humidity: Oversampling::X1,
            filter: Filter::Off,
        }
    }
}

impl Bme280Config {
    /// The datasheet's maximum measurement time (section 9.1), in µs, rounded up.
    pub fn max_measurement_us(&self) -> u32 {
        let t = self.temperature.samples();
        let p = self.pressure.samples();
        let h = self.humidity.samples();
        // 1.25 ms + 2.3 ms per temperature sample + (2.3 ms per sample + 0.575 ms) for P and H.
        let mut us = 1_250 + 2_300 * t;
        if p > 0 {
            us += 2_300 * p + 575;
        }
        if h > 0 {
            us += 2_300 * h + 575;
        }
        us
    }

    fn ctrl_meas(&self, mode: u8) -> u8 {
        ((self.temperature as u8) << 5) | ((self.pressure as u8) << 2) | mode
    }
}

/// Factory trimming parameters (datasheet table 16, `dig_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Calibration {
    pub t1: u16,
    pub t2: i16,
    pub t3: i16,
    pub p1: u16,
    pub p2: i16,
    pub p3: i16,
    pub p4: i16,
    pub p5: i16,
    pub p6: i16,
    pub p7: i16,
    pub p8: i16,
    pub p9: i16,
    pub h1: u8,
    pub h2: i16,
    pub h3: u8,
    pub h4: i16,
    pub h5: i16,
    pub h6: i8,
}

impl Calibration {
    /// Parse registers `0x88..=0xA1` (26 bytes) and `0xE1..=0xE7` (7 bytes).
    pub fn from_registers(a: &[u8; 26], b: &[u8; 7]) -> Self {
        let u = |i: usize| u16::from_le_bytes([a[i], a[i + 1]]);
        let s = |i: usize| i16::from_le_bytes([a[i], a[i + 1]]);
        Self {
            t1: u(0),
            t2: s(2),
            t3: s(4),
            p1: u(6),
            p2: s(8),
            p3: s(10),
            p4: s(12),
            p5: s(14),
            p6: s(16),
            p7: s(18),
            p8: s(20),
            p9: s(22),
            h1: a[25],
            h2: i16::from_le_bytes([b[0], b[1]]),
            h3: b[2],
            // H4 = 0xE4[7:0] << 4 | 0xE5[3:0]; H5 = 0xE6[7:0] << 4 | 0xE5[7:4]; both signed 12 bit.
            h4: (i16::from(b[3] as i8) << 4) | i16::from(b[4] & 0x0F),
            h5: (i16::from(b[5] as i8) << 4) | i16::from(b[4] >> 4),
            h6: b[6] as i8,
        }
    }

    /// `t_fine` and the temperature in 0.01 °C (datasheet `BME280_compensate_T_int32`).
    pub fn compensate_temperature(&self, adc_t: i32) -> (i32, i32) {
        let t1 = i32::from(self.t1);
        let var1 = (((adc_t >> 3) - (t1 << 1)) * i32::from(self.t2)) >> 11;
        let d = (adc_t >> 4) - t1;
        let var2 = (((d * d) >> 12) * i32::from(self.t3)) >> 14;
        let t_fine = var1 + var2;
        (t_fine, (t_fine * 5 + 128) >> 8)
    }

    /// Pressure in Pa as Q24.8 (datasheet `BME280_compensate_P_int64`); 0 if the calibration
    /// would divide by zero.
    pub fn compensate_pressure(&self, adc_p: i32, t_fine: i32) -> u32 {
        let mut var1 = i64::from(t_fine) - 128_000;
        let mut var2 = var1 * var1 * i64::from(self.p6);
        var2 += (var1 * i64::from(self.p5)) << 17;
        var2 += i64::from(self.p4) << 35;
        var1 = ((var1 * var1 * i64::from(self.p3)) >> 8) + ((var1 * i64::from(self.p2)) << 12);
        var1 = (((1i64 << 47) + var1) * i64::from(self.p1)) >> 33;
        if var1 == 0 {
            return 0;
        }
        let mut p: i64 = 1_048_576 - i64::from(adc_p);
        p = (((p << 31) - var2) * 3125) / var1;
        var1 = (i64::from(self.p9) * (p >> 13) * (p >> 13)) >> 25;
        var2 = (i64::from(self.p8) * p) >> 19;
        p = ((p + var1 + var2) >> 8) + (i64::from(self.p7) << 4);
        p as u32
    }

    /// Relative humidity in %RH as Q22.10 (datasheet `bme280_compensate_H_int32`).
    pub fn compensate_humidity(&self, adc_h: i32, t_fine: i32) -> u32 {
        let (h1, h2, h3) = (i32::from(self.h1), i32::from(self.h2), i32::from(self.h3));
        let (h4, h5, h6) = (i32::from(self.h4), i32::from(self.h5), i32::from(self.h6));
        let mut v = t_fine - 76_800;
        v = (((adc_h << 14) - (h4 << 20) - (h5 * v) + 16_384) >> 15)
            * (((((((v * h6) >> 10) * (((v * h3) >> 11) + 32_768)) >> 10) + 2_097_152) * h2
                + 8_192)
                >> 14);
        v -= ((((v >> 15) * (v >> 15)) >> 7) * h1) >> 4;
        v = v.clamp(0, 419_430_400);
        (v >> 12) as u32
    }

    /// Compensate one raw measurement.
    pub fn compensate(&self, raw: RawMeasurement) -> Measurement {
        let (t_fine, centi_celsius) = self.compensate_temperature(raw.temperature);
        Measurement {
            temperature_centi_celsius: centi_celsius,
            pressure_pa_q24_8: self.compensate_pressure(raw.pressure, t_fine),
            humidity_q22_10: self.compensate_humidity(raw.humidity, t_fine),
        }
    }
}

/// The ADC values of one measurement (20-bit temperature and pressure, 16-bit humidity).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawMeasurement {
    pub pressure: i32,
    pub temperature: i32,
    pub humidity: i32,
}

impl RawMeasurement {
    /// Parse the burst read of registers `0xF7..=0xFE`.
    pub fn from_registers(d: &[u8; 8]) -> Self {
        let u20 = |i: usize| {
            (i32::from(d[i]) << 12) | (i32::from(d[i + 1]) << 4) | (i32::from(d[i + 2]) >> 4)
        };
        Self {
            pressure: u20(0),
            temperature: u20(3),
            humidity: (i32::from(d[6]) << 8) | i32::from(d[7]),
        }
    }
}

/// One compensated measurement, in the datasheet's fixed-point units.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Measurement {
    /// 0.01 °C: 2508 is 25.08 °C.
    pub temperature_centi_celsius: i32,
    /// Pa in Q24.8: 25767233 is 100653.254 Pa.
    pub pressure_pa_q24_8: u32,
    /// %RH in Q22.10: 47445 is 46.333 %RH.
    pub humidity_q22_10: u32,
}

impl Measurement {
    pub fn celsius(&self) -> f64 {
        f64::from(self.temperature_centi_celsius) / 100.0
    }

    pub fn pascal(&self) -> f64 {
        f64::from(self.pressure_pa_q24_8) / 256.0
    }

    pub fn relative_humidity(&self) -> f64 {
        f64::from(self.humidity_q22_10) / 1024.0
    }
}

/// What went wrong talking to a BME280; `E` is the I2C bus error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bme280Error<E> {
    /// The bus failed (NACK, arbitration loss, ...).
    Bus(E),
    /// Register `0xD0` is not [`CHIP_ID`]: not a BME280 (or the wrong address).
    WrongChip { id: u8 },
    /// The calibration copy (`im_update`) did not finish after a reset.
    CalibrationNotReady,
    /// A channel came back as "skipped" (0x80000 / 0x8000): the measurement did not run.
    Skipped { channel: &'static str },
}

impl<E: fmt::Debug> fmt::Display for Bme280Error<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Bus(e) => write!(f, "BME280 I2C bus error: {e:?}"),
            Self::WrongChip { id } => write!(
                f,
                "chip id is 0x{id:02x}, a BME280 has 0x{CHIP_ID:02x} (wrong address or sensor)"
            ),
            Self::CalibrationNotReady => {
                f.write_str("BME280 calibration was still loading after the reset")
            }
            Self::Skipped { channel } => {
                write!(f, "BME280 returned no {channel} (channel skipped)")
            }
        }
    }
}

impl<E: fmt::Debug> core::error::Error for Bme280Error<E> {}

/// A BME280 on an I2C bus, calibrated and configured.
#[derive(Debug)]
pub struct Bme280<I> {
    i2c: I,
    address: u8,
    config: Bme280Config,
    calibration: Calibration,
}

impl<I: I2c> Bme280<I> {
    /// Check the chip id, soft-reset the sensor, wait for the calibration copy, read the
    /// calibration and write the configuration (the sensor is left asleep).
    pub fn new<D: DelayNs>(
        i2c: I,
        address: u8,
        config: Bme280Config,
        delay: &mut D,
    ) -> Result<Self, Bme280Error<I::Error>> {
        let mut this = Self {
            i2c,
            address,
            config,
            calibration: Calibration::default(),
        };
        let id = this.read_u8(reg::CHIP_ID)?;
        if id != CHIP_ID {
            return Err(Bme280Error::WrongChip { id });
        }
        this.write(reg::RESET, RESET_COMMAND)?;
        delay.delay_ms(STARTUP_MS);
        let mut ready = false;
        for _ in 0..NVM_POLLS {
            if this.read_u8(reg::STATUS)? & STATUS_IM_UPDATE == 0 {
                ready = true;
                break;
            }
            delay.delay_ms(1);
        }
        if !ready {
            return Err(Bme280Error::CalibrationNotReady);
        }
        let mut a = [0u8; 26];
        let mut b = [0u8; 7];
        this.read(reg::CALIB_00, &mut a)?;
        this.read(reg::CALIB_26, &mut b)?;
        this.calibration = Calibration::from_registers(&a, &b);
        // ctrl_hum takes effect only with the next ctrl_meas write; config only in sleep mode.
        this.write(reg::CTRL_HUM, this.config.humidity as u8)?;
        this.write(reg::CONFIG, (this.config.filter as u8) << 2)?;
        this.write(reg::CTRL_MEAS, this.config.ctrl_meas(0))?;
        Ok(this)
    }

    pub fn calibration(&self) -> &Calibration {
        &self.calibration
    }

    /// Run one forced-mode measurement and compensate it.
    pub fn measure<D: DelayNs>(
        &mut self,
        delay: &mut D,
    ) -> Result<Measurement, Bme280Error<I::Error>> {
        let raw = self.measure_raw(delay)?;
        if raw.temperature == SKIPPED_20BIT {
            return Err(Bme280Error::Skipped {
                channel: "temperature",
            });
        }
        if raw.pressure == SKIPPED_20BIT && self.config.pressure != Oversampling::Skip {
            return Err(Bme280Error::Skipped {
                channel: "pressure",
            });
        }
        if raw.humidity == SKIPPED_16BIT && self.config.humidity != Oversampling::Skip {
            return Err(Bme280Error::Skipped {
                channel: "humidity",
            });
        }
        Ok(self.calibration.compensate(raw))
    }

    /// Run one forced-mode measurement and return the ADC values.
    pub fn measure_raw<D: DelayNs>(
        &mut self,
        delay: &mut D,
    ) -> Result<RawMeasurement, Bme280Error<I::Error>> {
        self.write(reg::CTRL_MEAS, self.config.ctrl_meas(MODE_FORCED))?;
        delay.delay_us(self.config.max_measurement_us());
        let mut d = [0u8; 8];
        self.read(reg::DATA, &mut d)?;
        Ok(RawMeasurement::from_registers(&d))
    }

    /// Give the bus back.
    pub fn release(self) -> I {
        self.i2c
    }

    fn read_u8(&mut self, register: u8) -> Result<u8, Bme280Error<I::Error>> {
        let mut b = [0u8; 1];
        self.read(register, &mut b)?;
        Ok(b[0])
    }

    fn read(&mut self, register: u8, buf: &mut [u8]) -> Result<(), Bme280Error<I::Error>> {
        self.i2c
            .write_read(self.address, &[register], buf)
            .map_err(Bme280Error::Bus)
    }

    fn write(&mut self, register: u8, value: u8) -> Result<(), Bme280Error<I::Error>> {
        self.i2c
            .write(self.address, &[register, value])
            .map_err(Bme280Error::Bus)
    }
}

/// The datasheet's worked example calibration and ADC values (BMP280 datasheet, section 3.12,
/// table 16; the BME280 uses the same temperature and pressure formulas), plus humidity
/// trimming values read from a real BME280. Shared by the tests, the MCU self-test and the
/// simulated sensor.
pub mod datasheet_example {
    use super::Calibration;

    pub const CALIBRATION: Calibration = Calibration {
        t1: 27504,
        t2: 26435,
        t3: -1000,
        p1: 36477,
        p2: -10685,
        p3: 3024,
        p4: 2855,
        p5: 140,
        p6: -7,
        p7: 15500,
        p8: -14600,
        p9: 6000,
        h1: 75,
        h2: 362,
        h3: 0,
        h4: 313,
        h5: 50,
        h6: 30,
    };
    pub const ADC_T: i32 = 519_888;
    pub const ADC_P: i32 = 415_148;
    /// Datasheet: t_fine = 128422, T = 25.08 °C.
    pub const T_FINE: i32 = 128_422;
    pub const CENTI_CELSIUS: i32 = 2508;
    /// The datasheet's 64-bit integer code, executed: 25767233 / 256 = 100653.254 Pa. (The
    /// datasheet's table prints 25767236, i.e. 100653.27 Pa; running its published formula
    /// gives 3 LSB = 0.012 Pa less. The printed double-precision result is 100653.27 Pa.)
    pub const PRESSURE_Q24_8: u32 = 25_767_233;
    /// The datasheet's printed result, Pa.
    pub const PASCAL: f64 = 100_653.27;

    /// The same calibration as the sensor's registers `0x88..=0xA1` and `0xE1..=0xE7`.
    pub const fn registers() -> ([u8; 26], [u8; 7]) {
        let c = CALIBRATION;
        let mut a = [0u8; 26];
        let words: [u16; 12] = [
            c.t1,
            c.t2 as u16,
            c.t3 as u16,
            c.p1,
            c.p2 as u16,
            c.p3 as u16,
            c.p4 as u16,
            c.p5 as u16,
            c.p6 as u16,
            c.p7 as u16,
            c.p8 as u16,
            c.p9 as u16,
        ];
        let mut i = 0;
        while i < 12 {
            let le = words[i].to_le_bytes();
            a[2 * i] = le[0];
            a[2 * i + 1] = le[1];
            i += 1;
        }
        a[25] = c.h1;
        let h2 = (c.h2 as u16).to_le_bytes();
        let b = [
            h2[0],
            h2[1],
            c.h3,
            (c.h4 >> 4) as u8,
            ((c.h4 & 0x0F) as u8) | (((c.h5 & 0x0F) as u8) << 4),
            (c.h5 >> 4) as u8,
            c.h6 as u8,
        ];
        (a, b)
    }
}

/// A BME280 simulated at the register level behind an [`I2c`] implementation: the same driver
/// code runs against it as against the chip. Each forced-mode request latches the next raw
/// sample from a deterministic ramp (used by the MCU self-test and the tests).
pub mod simulated {
    use embedded_hal::i2c::{ErrorKind, ErrorType, I2c, NoAcknowledgeSource, Operation};

    use super::{datasheet_example as ex, reg};

    pub struct SimulatedBme280 {
        address: u8,
        regs: [u8; 256],
        pointer: u8,
        samples: u32,
    }

    impl SimulatedBme280 {
        pub fn new(address: u8) -> Self {
            let mut regs = [0u8; 256];
            let (a, b) = ex::registers();
            regs[usize::from(reg::CALIB_00)..][..26].copy_from_slice(&a);
            regs[usize::from(reg::CALIB_26)..][..7].copy_from_slice(&b);
            regs[usize::from(reg::CHIP_ID)] = super::CHIP_ID;
            Self {
                address,
                regs,
                pointer: 0,
                samples: 0,
            }
        }

        /// Raw (pressure, temperature, humidity) of sample `n`: the datasheet example, drifting.
        pub fn raw(n: u32) -> (i32, i32, i32) {
            let n = n as i32;
            (ex::ADC_P - 100 * n, ex::ADC_T + 800 * n, 30_000 + 150 * n)
        }

        /// Forced-mode measurements taken so far.
        pub fn samples(&self) -> u32 {
            self.samples
        }

        fn write_register(&mut self, register: u8, value: u8) {
            self.regs[usize::from(register)] = value;
            if register == reg::CTRL_MEAS && value & 0b11 != 0 {
                let (p, t, h) = Self::raw(self.samples);
                self.samples += 1;
                let d = [
                    (p >> 12) as u8,
                    (p >> 4) as u8,
                    ((p & 0xF) << 4) as u8,
                    (t >> 12) as u8,
                    (t >> 4) as u8,
                    ((t & 0xF) << 4) as u8,
                    (h >> 8) as u8,
                    h as u8,
                ];
                self.regs[usize::from(reg::DATA)..][..8].copy_from_slice(&d);
            }
        }
    }

    impl ErrorType for SimulatedBme280 {
        type Error = ErrorKind;
    }

    impl I2c for SimulatedBme280 {
        fn transaction(
            &mut self,
            address: u8,
            operations: &mut [Operation<'_>],
        ) -> Result<(), ErrorKind> {
            if address != self.address {
                return Err(ErrorKind::NoAcknowledge(NoAcknowledgeSource::Address));
            }
            for op in operations {
                match op {
                    Operation::Write(bytes) => {
                        let Some((&pointer, data)) = bytes.split_first() else {
                            continue;
                        };
                        self.pointer = pointer;
                        for &b in data {
                            self.write_register(self.pointer, b);
                            self.pointer = self.pointer.wrapping_add(1);
                        }
                    }
                    Operation::Read(buf) => {
                        for b in buf.iter_mut() {
                            *b = self.regs[usize::from(self.pointer)];
                            self.pointer = self.pointer.wrapping_add(1);
                        }
                    }
                }
            }
            Ok(())
        }
    }
}

#[cfg(test)]
// Register values are written grouped by field (osrs_t | osrs_p | mode), not by nibble.
#[allow(clippy::unusual_byte_groupings)]
mod tests {
    extern crate std;
    use std::vec;
    use std::vec::Vec;

    use embedded_hal::i2c::ErrorKind;
    use embedded_hal_mock::eh1::delay::{CheckedDelay, NoopDelay, Transaction as Delay};
    use embedded_hal_mock::eh1::i2c::{Mock as I2cMock, Transaction as I2cT};

    use super::datasheet_example as ex;
    use super::*;

    const A: u8 = ADDRESS_PRIMARY;

    fn init_transactions() -> Vec<I2cT> {
        let (a, b) = ex::registers();
        vec![
            I2cT::write_read(A, vec![0xD0], vec![0x60]),
            I2cT::write(A, vec![0xE0, 0xB6]),
            I2cT::write_read(A, vec![0xF3], vec![0x01]), // still copying the NVM
            I2cT::write_read(A, vec![0xF3], vec![0x00]),
            I2cT::write_read(A, vec![0x88], a.to_vec()),
            I2cT::write_read(A, vec![0xE1], b.to_vec()),
            I2cT::write(A, vec![0xF2, 0b001]),        // osrs_h x1
            I2cT::write(A, vec![0xF5, 0b000_000_00]), // filter off
            I2cT::write(A, vec![0xF4, 0b001_001_00]), // osrs_t x1, osrs_p x1, sleep
        ]
    }

    /// The data registers for raw values (pressure, temperature, humidity).
    fn data(p: i32, t: i32, h: i32) -> Vec<u8> {
        vec![
            (p >> 12) as u8,
            (p >> 4) as u8,
            ((p & 0xF) << 4) as u8,
            (t >> 12) as u8,
            (t >> 4) as u8,
            ((t & 0xF) << 4) as u8,
            (h >> 8) as u8,
            h as u8,
        ]
    }

    #[test]
    fn datasheet_example_temperature_and_pressure() {
        let c = ex::CALIBRATION;
        let (t_fine, t) = c.compensate_temperature(ex::ADC_T);
        assert_eq!((t_fine, t), (ex::T_FINE, ex::CENTI_CELSIUS));
        let p = c.compensate_pressure(ex::ADC_P, t_fine);
        assert_eq!(p, ex::PRESSURE_Q24_8);
        assert!((f64::from(p) / 256.0 - ex::PASCAL).abs() < 0.02);
        // And the double-precision reference formula gives the printed value.
        let (t, p, _) = reference(&c, ex::ADC_T, ex::ADC_P, 30_000);
        assert!((t - 25.08).abs() < 0.005, "{t}");
        assert!((p - ex::PASCAL).abs() < 0.01, "{p}");
    }

    /// The datasheet's double-precision formulas (section 8.1), as an independent reference.
    fn reference(c: &Calibration, adc_t: i32, adc_p: i32, adc_h: i32) -> (f64, f64, f64) {
        let (adc_t, adc_p, adc_h) = (f64::from(adc_t), f64::from(adc_p), f64::from(adc_h));
        let t1 = f64::from(c.t1);
        let v1 = (adc_t / 16384.0 - t1 / 1024.0) * f64::from(c.t2);
        let v2 = (adc_t / 131072.0 - t1 / 8192.0).powi(2) * f64::from(c.t3);
        let t_fine = v1 + v2;
        let t = t_fine / 5120.0;

        let mut v1 = t_fine / 2.0 - 64000.0;
        let mut v2 = v1 * v1 * f64::from(c.p6) / 32768.0;
        v2 += v1 * f64::from(c.p5) * 2.0;
        v2 = v2 / 4.0 + f64::from(c.p4) * 65536.0;
        v1 = (f64::from(c.p3) * v1 * v1 / 524288.0 + f64::from(c.p2) * v1) / 524288.0;
        v1 = (1.0 + v1 / 32768.0) * f64::from(c.p1);
        let mut p = 1048576.0 - adc_p;
        p = (p - v2 / 4096.0) * 6250.0 / v1;
        let v1 = f64::from(c.p9) * p * p / 2147483648.0;
        let v2 = p * f64::from(c.p8) / 32768.0;
        p += (v1 + v2 + f64::from(c.p7)) / 16.0;

        let mut h = t_fine - 76800.0;
        h = (adc_h - (f64::from(c.h4) * 64.0 + f64::from(c.h5) / 16384.0 * h))
            * (f64::from(c.h2) / 65536.0
                * (1.0
                    + f64::from(c.h6) / 67108864.0 * h * (1.0 + f64::from(c.h3) / 67108864.0 * h)));
        h *= 1.0 - f64::from(c.h1) * h / 524288.0;
        (t, p, h.clamp(0.0, 100.0))
    }

    #[test]
    fn integer_compensation_agrees_with_the_double_precision_reference() {
        let c = ex::CALIBRATION;
        let mut checked = 0;
        for adc_t in (400_000..=640_000).step_by(16_000) {
            for adc_p in (250_000..=450_000).step_by(20_000) {
                for adc_h in (20_000..=40_000).step_by(2_000) {
                    let m = c.compensate(RawMeasurement {
                        pressure: adc_p,
                        temperature: adc_t,
                        humidity: adc_h,
                    });
                    let (t, p, h) = reference(&c, adc_t, adc_p, adc_h);
                    assert!((m.celsius() - t).abs() < 0.011, "T {} vs {t}", m.celsius());
                    assert!((m.pascal() - p).abs() < 1.0, "P {} vs {p}", m.pascal());
                    assert!(
                        (m.relative_humidity() - h).abs() < 0.05,
                        "H {} vs {h} (adc_t {adc_t}, adc_h {adc_h})",
                        m.relative_humidity()
                    );
                    checked += 1;
                }
            }
        }
        assert_eq!(checked, 16 * 11 * 11);
    }

    #[test]
    fn calibration_registers_round_trip_including_the_split_h4_h5() {
        let (a, b) = ex::registers();
        assert_eq!(Calibration::from_registers(&a, &b), ex::CALIBRATION);
        // Negative H4/H5 share register 0xE5: sign extension must come from 0xE4 / 0xE6.
        let b = [0x6A, 0x01, 0x00, 0xF3, 0x2D, 0xFE, 0x1E];
        let c = Calibration::from_registers(&[0; 26], &b);
        assert_eq!((c.h2, c.h4, c.h5, c.h6), (362, -195, -30, 30));
    }

    #[test]
    fn init_and_one_measurement_make_exactly_the_datasheet_transactions() {
        let mut expected = init_transactions();
        expected.extend([
            I2cT::write(A, vec![0xF4, 0b001_001_01]), // forced mode
            I2cT::write_read(A, vec![0xF7], data(ex::ADC_P, ex::ADC_T, 30_000)),
        ]);
        let mut i2c = I2cMock::new(&expected);
        let mut delay = CheckedDelay::new(&[
            Delay::delay_ms(2),
            Delay::delay_ms(1),
            Delay::delay_us(9_300),
        ]);
        let mut bme = Bme280::new(i2c.clone(), A, Bme280Config::default(), &mut delay).unwrap();
        assert_eq!(bme.calibration(), &ex::CALIBRATION);
        let m = bme.measure(&mut delay).unwrap();
        assert_eq!(m.temperature_centi_celsius, 2508);
        assert_eq!(m.pressure_pa_q24_8, ex::PRESSURE_Q24_8);
        let (_, _, h) = reference(&ex::CALIBRATION, ex::ADC_T, ex::ADC_P, 30_000);
        assert!((m.relative_humidity() - h).abs() < 0.05);
        i2c.done();
        delay.done();
    }

    #[test]
    fn a_different_chip_is_refused_before_anything_is_written() {
        let mut i2c = I2cMock::new(&[I2cT::write_read(A, vec![0xD0], vec![0x58])]);
        let err = Bme280::new(i2c.clone(), A, Bme280Config::default(), &mut NoopDelay).unwrap_err();
        assert_eq!(err, Bme280Error::WrongChip { id: 0x58 });
        assert!(std::format!("{err}").contains("0x58"));
        i2c.done();
    }

    #[test]
    fn bus_errors_are_returned_not_panicked() {
        let mut i2c = I2cMock::new(&[
            I2cT::write_read(A, vec![0xD0], vec![0x60]),
            I2cT::write(A, vec![0xE0, 0xB6]).with_error(ErrorKind::Other),
        ]);
        let err = Bme280::new(i2c.clone(), A, Bme280Config::default(), &mut NoopDelay).unwrap_err();
        assert_eq!(err, Bme280Error::Bus(ErrorKind::Other));
        i2c.done();

        let mut expected = init_transactions();
        expected.extend([
            I2cT::write(A, vec![0xF4, 0b001_001_01]),
            I2cT::write_read(A, vec![0xF7], vec![0; 8]).with_error(ErrorKind::Other),
        ]);
        let mut i2c = I2cMock::new(&expected);
        let mut bme = Bme280::new(i2c.clone(), A, Bme280Config::default(), &mut NoopDelay).unwrap();
        assert_eq!(
            bme.measure(&mut NoopDelay),
            Err(Bme280Error::Bus(ErrorKind::Other))
        );
        i2c.done();
    }

    #[test]
    fn a_stuck_calibration_copy_and_skipped_channels_are_errors() {
        let mut t = vec![
            I2cT::write_read(A, vec![0xD0], vec![0x60]),
            I2cT::write(A, vec![0xE0, 0xB6]),
        ];
        t.extend((0..NVM_POLLS).map(|_| I2cT::write_read(A, vec![0xF3], vec![0x01])));
        let mut i2c = I2cMock::new(&t);
        let err = Bme280::new(i2c.clone(), A, Bme280Config::default(), &mut NoopDelay).unwrap_err();
        assert_eq!(err, Bme280Error::CalibrationNotReady);
        i2c.done();

        let mut expected = init_transactions();
        expected.extend([
            I2cT::write(A, vec![0xF4, 0b001_001_01]),
            I2cT::write_read(A, vec![0xF7], data(ex::ADC_P, ex::ADC_T, 0x8000)),
        ]);
        let mut i2c = I2cMock::new(&expected);
        let mut bme = Bme280::new(i2c.clone(), A, Bme280Config::default(), &mut NoopDelay).unwrap();
        assert_eq!(
            bme.measure(&mut NoopDelay),
            Err(Bme280Error::Skipped {
                channel: "humidity"
            })
        );
        i2c.done();
    }

    #[test]
    fn the_driver_runs_against_the_simulated_chip() {
        use super::simulated::SimulatedBme280;
        let mut bme = Bme280::new(
            SimulatedBme280::new(A),
            A,
            Bme280Config::default(),
            &mut NoopDelay,
        )
        .unwrap();
        let m = bme.measure(&mut NoopDelay).unwrap();
        assert_eq!(m.temperature_centi_celsius, 2508);
        assert_eq!(m.pressure_pa_q24_8, ex::PRESSURE_Q24_8);
        let m2 = bme.measure(&mut NoopDelay).unwrap();
        assert!(m2.temperature_centi_celsius > m.temperature_centi_celsius);
        assert_eq!(bme.release().samples(), 2);
        assert!(matches!(
            Bme280::new(
                SimulatedBme280::new(0x77),
                A,
                Bme280Config::default(),
                &mut NoopDelay
            ),
            Err(Bme280Error::Bus(_))
        ));
    }

    #[test]
    fn oversampling_sets_the_registers_and_the_wait() {
        let cfg = Bme280Config {
            temperature: Oversampling::X2,
            pressure: Oversampling::X16,
            humidity: Oversampling::Skip,
            filter: Filter::X4,
        };
        // 1.25 + 2.3*2 + 2.3*16 + 0.575 = 43.225 ms (datasheet 9.1).
        assert_eq!(cfg.max_measurement_us(), 43_225);
        assert_eq!(cfg.ctrl_meas(MODE_FORCED), 0b010_101_01);
        assert_eq!(Bme280Config::default().max_measurement_us(), 9_300);
    }
}
