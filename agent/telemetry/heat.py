"""Heat readings: SoC temperature, current CPU frequency, and the Raspberry Pi firmware's
throttling flags.

A fanless Pi throttles within minutes of sustained inference; these readings put the cause next to
the tokens/s it costs. Where each comes from differs per board, so the files are found once (under
an injectable root, for fixture trees) and looked up again only when a read fails.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# Thermal zone types that are the SoC/CPU on common boards, best first. Anything else (a battery,
# a wifi chip) is only used when none of these exists.
_SOC_ZONE_TYPES = ("cpu-thermal", "cpu_thermal", "soc-thermal", "soc_thermal", "cpu0-thermal", "x86_pkg_temp", "acpitz")

# Where the Raspberry Pi firmware driver exposes get_throttled (the path of the firmware node
# differs between SoCs and kernel versions).
_THROTTLED_GLOBS = (
    "sys/devices/platform/soc/soc:firmware/get_throttled",
    "sys/devices/platform/*/soc:firmware/get_throttled",
    "sys/devices/platform/*firmware*/get_throttled",
    "sys/devices/platform/*/*firmware*/get_throttled",
)

UNDER_VOLTAGE, FREQ_CAPPED, THROTTLED, SOFT_TEMP_LIMIT = 1 << 0, 1 << 1, 1 << 2, 1 << 3
NOW_MASK = 0xF


@dataclass(frozen=True)
class HeatReading:
    soc_temp_c: float | None
    cpu_freq_mhz: float | None
    throttled_flags: int | None
    reasons: dict[str, str]  # reading name -> why it is missing


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


class HeatReader:
    """Finds the board's heat files under ``root`` and reads them. Not thread-safe: one owner."""

    def __init__(self, root: Path = Path("/")) -> None:
        self.root = root
        self._zone: Path | None = None
        self._freq: list[Path] = []
        self._throttled: Path | None = None
        self._volt_alarm: Path | None = None
        self._discover()

    def _discover(self) -> None:
        zones = sorted((self.root / "sys/class/thermal").glob("thermal_zone*"))
        typed = [(_read(z / "type") or "", z) for z in zones if (z / "temp").exists()]
        best = sorted(
            typed, key=lambda t: _SOC_ZONE_TYPES.index(t[0]) if t[0] in _SOC_ZONE_TYPES else len(_SOC_ZONE_TYPES)
        )
        self._zone = best[0][1] if best else None

        cpu = self.root / "sys/devices/system/cpu"
        self._freq = sorted(cpu.glob("cpufreq/policy*/scaling_cur_freq")) or sorted(
            cpu.glob("cpu[0-9]*/cpufreq/scaling_cur_freq")
        )

        self._throttled = next((p for g in _THROTTLED_GLOBS for p in sorted(self.root.glob(g))), None)
        # Kernels without get_throttled still report under-voltage through the rpi_volt hwmon.
        self._volt_alarm = None
        for hw in sorted((self.root / "sys/class/hwmon").glob("hwmon*")):
            if _read(hw / "name") == "rpi_volt" and (hw / "in0_lcrit_alarm").exists():
                self._volt_alarm = hw / "in0_lcrit_alarm"
                break

    def read(self) -> HeatReading:
        reasons: dict[str, str] = {}
        temp = None
        if self._zone is not None:
            raw = _read(self._zone / "temp")
            try:
                temp = round(int(raw) / 1000.0, 1) if raw is not None else None
            except ValueError:
                temp = None
        if temp is None:
            reasons["thermal"] = "no readable /sys/class/thermal/thermal_zone*/temp (no thermal driver, or a VM)"

        freq = None
        khz = []
        for p in self._freq:
            raw = _read(p)
            if raw is not None and raw.isdigit():
                khz.append(int(raw))
        if khz:
            freq = round(max(khz) / 1000.0, 1)
        else:
            reasons["cpufreq"] = "no cpufreq scaling_cur_freq (no cpufreq driver, or a VM)"

        flags = None
        if self._throttled is not None:
            raw = _read(self._throttled)
            try:
                flags = int(raw, 16) if raw else None
            except ValueError:
                flags = None
        if flags is None and self._volt_alarm is not None:
            raw = _read(self._volt_alarm)
            flags = UNDER_VOLTAGE if raw == "1" else 0 if raw == "0" else None
        if flags is None:
            reasons["throttling"] = "no Raspberry Pi firmware get_throttled or rpi_volt hwmon on this board"
        return HeatReading(temp, freq, flags, reasons)


def decode(flags: int | None) -> dict[str, bool | None]:
    """The 'now' bits of get_throttled as named booleans (all None when the flags are unknown)."""
    if flags is None:
        return {"under_voltage": None, "freq_capped": None, "throttled": None, "soft_temp_limit": None}
    return {
        "under_voltage": bool(flags & UNDER_VOLTAGE),
        "freq_capped": bool(flags & FREQ_CAPPED),
        "throttled": bool(flags & THROTTLED),
        "soft_temp_limit": bool(flags & SOFT_TEMP_LIMIT),
    }


__all__ = ["HeatReader", "HeatReading", "decode", "NOW_MASK"]
