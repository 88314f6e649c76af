"""SCSI sense data and command outcomes → our errors (pure: no I/O, no trio).

:func:`parse_sense` decodes fixed (0x70/0x71) and descriptor (0x72/0x73) format sense;
:func:`classify` turns one completed command (virtio-scsi response, SCSI status, sense)
into a :class:`Verdict`: success, retry (and after how long), or the error to raise.

Mapping (also in docs/scsi.md):

=====================  ===========================================  ======================
condition              error                                        errno
=====================  ===========================================  ======================
MEDIUM ERROR           MediumError                                  EIO
DATA PROTECT           WriteProtected                               EROFS
NOT READY 04/01        retried (becoming ready), then NoMedium      ENOMEDIUM
NOT READY (other)      NoMedium                                     ENOMEDIUM
ILLEGAL REQUEST        IllegalRequest                               EINVAL for 1A/21/24/26
                                                                    (the request was
                                                                    invalid), else EIO
HARDWARE ERROR         HardwareError                                EIO
UNIT ATTENTION         retried; DiskChanged if it persists          EIO
ABORTED COMMAND        retried; 00/06 (QEMU: host I/O error) is a   EIO
                       MediumError at once
NO SENSE, RECOVERED    success (the data transferred is good)       -
BUSY, TASK SET FULL    retried after a pause, then HardwareError    EIO
RESERVATION CONFLICT   HardwareError                                EIO
virtio BAD_TARGET      DeviceGone (the target is not there)         EIO
virtio RESET/ABORTED   retried
virtio BUSY            retried after a pause
virtio other failures  HardwareError                                EIO
=====================  ===========================================  ======================

Messages name the command, the sense key, ASC/ASCQ and their meaning.
"""

from __future__ import annotations

import enum
import errno as _errno
import struct
from dataclasses import dataclass

from amigafuse.driver.scsi import transport as vt
from amigafuse.errors import (
    DeviceError,
    DeviceGone,
    DiskChanged,
    HardwareError,
    IllegalRequest,
    MediumError,
    NoMedium,
    WriteProtected,
)

# ----------------------------------------------------------------------------- constants

STATUS_GOOD = 0x00
STATUS_CHECK_CONDITION = 0x02
STATUS_CONDITION_MET = 0x04
STATUS_BUSY = 0x08
STATUS_RESERVATION_CONFLICT = 0x18
STATUS_TASK_SET_FULL = 0x28
STATUS_ACA_ACTIVE = 0x30
STATUS_TASK_ABORTED = 0x40

STATUS_NAMES = {
    STATUS_GOOD: "GOOD",
    STATUS_CHECK_CONDITION: "CHECK CONDITION",
    STATUS_CONDITION_MET: "CONDITION MET",
    STATUS_BUSY: "BUSY",
    STATUS_RESERVATION_CONFLICT: "RESERVATION CONFLICT",
    STATUS_TASK_SET_FULL: "TASK SET FULL",
    STATUS_ACA_ACTIVE: "ACA ACTIVE",
    STATUS_TASK_ABORTED: "TASK ABORTED",
}

NO_SENSE = 0x0
RECOVERED_ERROR = 0x1
NOT_READY = 0x2
MEDIUM_ERROR = 0x3
HARDWARE_ERROR = 0x4
ILLEGAL_REQUEST = 0x5
UNIT_ATTENTION = 0x6
DATA_PROTECT = 0x7
BLANK_CHECK = 0x8
VENDOR_SPECIFIC = 0x9
COPY_ABORTED = 0xA
ABORTED_COMMAND = 0xB
VOLUME_OVERFLOW = 0xD
MISCOMPARE = 0xE
COMPLETED = 0xF

SENSE_KEY_NAMES = {
    NO_SENSE: "NO SENSE",
    RECOVERED_ERROR: "RECOVERED ERROR",
    NOT_READY: "NOT READY",
    MEDIUM_ERROR: "MEDIUM ERROR",
    HARDWARE_ERROR: "HARDWARE ERROR",
    ILLEGAL_REQUEST: "ILLEGAL REQUEST",
    UNIT_ATTENTION: "UNIT ATTENTION",
    DATA_PROTECT: "DATA PROTECT",
    BLANK_CHECK: "BLANK CHECK",
    VENDOR_SPECIFIC: "VENDOR SPECIFIC",
    COPY_ABORTED: "COPY ABORTED",
    ABORTED_COMMAND: "ABORTED COMMAND",
    0xC: "RESERVED (0xC)",
    VOLUME_OVERFLOW: "VOLUME OVERFLOW",
    MISCOMPARE: "MISCOMPARE",
    COMPLETED: "COMPLETED",
}

# Additional sense codes we name (SPC-4 annex D; the ones disks and QEMU report).
ASC_NAMES: dict[tuple[int, int], str] = {
    (0x00, 0x00): "no additional sense information",
    (0x00, 0x06): "I/O process terminated",
    (0x02, 0x00): "no seek complete",
    (0x03, 0x00): "peripheral device write fault",
    (0x04, 0x00): "logical unit not ready, cause not reportable",
    (0x04, 0x01): "logical unit is in process of becoming ready",
    (0x04, 0x02): "logical unit not ready, initializing command required",
    (0x04, 0x03): "logical unit not ready, manual intervention required",
    (0x04, 0x04): "logical unit not ready, format in progress",
    (0x05, 0x00): "logical unit does not respond to selection",
    (0x08, 0x00): "logical unit communication failure",
    (0x0C, 0x00): "write error",
    (0x0C, 0x02): "write error, auto reallocation failed",
    (0x10, 0x00): "ID CRC or ECC error",
    (0x11, 0x00): "unrecovered read error",
    (0x11, 0x04): "unrecovered read error, auto reallocate failed",
    (0x14, 0x01): "record not found",
    (0x1A, 0x00): "parameter list length error",
    (0x20, 0x00): "invalid command operation code",
    (0x21, 0x00): "logical block address out of range",
    (0x24, 0x00): "invalid field in CDB",
    (0x25, 0x00): "logical unit not supported",
    (0x26, 0x00): "invalid field in parameter list",
    (0x27, 0x00): "write protected",
    (0x27, 0x01): "hardware write protected",
    (0x27, 0x02): "logical unit software write protected",
    (0x27, 0x07): "space allocation failed write protect",
    (0x28, 0x00): "not ready to ready change, medium may have changed",
    (0x29, 0x00): "power on, reset, or bus device reset occurred",
    (0x29, 0x01): "power on occurred",
    (0x29, 0x02): "SCSI bus reset occurred",
    (0x29, 0x03): "bus device reset function occurred",
    (0x29, 0x04): "device internal reset",
    (0x2A, 0x01): "mode parameters changed",
    (0x2A, 0x09): "capacity data has changed",
    (0x31, 0x00): "medium format corrupted",
    (0x3A, 0x00): "medium not present",
    (0x3E, 0x03): "logical unit failed self-test",
    (0x3F, 0x01): "microcode has been changed",
    (0x3F, 0x0E): "reported LUNs data has changed",
    (0x44, 0x00): "internal target failure",
    (0x47, 0x00): "SCSI parity error",
    (0x4B, 0x00): "data phase error",
    (0x55, 0x00): "system resource failure",
    (0x5D, 0x00): "failure prediction threshold exceeded",
}

# ILLEGAL REQUEST codes that mean "the request itself was invalid" (EINVAL).
_INVALID_REQUEST_ASCS = frozenset({0x1A, 0x21, 0x24, 0x26})

VIRTIO_RESPONSE_NAMES = {
    vt.VIRTIO_SCSI_S_OK: "OK",
    vt.VIRTIO_SCSI_S_OVERRUN: "OVERRUN",
    vt.VIRTIO_SCSI_S_ABORTED: "ABORTED",
    vt.VIRTIO_SCSI_S_BAD_TARGET: "BAD_TARGET",
    vt.VIRTIO_SCSI_S_RESET: "RESET",
    vt.VIRTIO_SCSI_S_BUSY: "BUSY",
    vt.VIRTIO_SCSI_S_TRANSPORT_FAILURE: "TRANSPORT_FAILURE",
    vt.VIRTIO_SCSI_S_TARGET_FAILURE: "TARGET_FAILURE",
    vt.VIRTIO_SCSI_S_NEXUS_FAILURE: "NEXUS_FAILURE",
    vt.VIRTIO_SCSI_S_FAILURE: "FAILURE",
}

BUSY_RETRY_DELAY_S = 0.01
NOT_READY_RETRY_DELAY_S = 0.1


def asc_meaning(asc: int, ascq: int) -> str:
    """What an ASC/ASCQ pair means, or a neutral description for ones we do not name."""
    name = ASC_NAMES.get((asc, ascq))
    if name is not None:
        return name
    if asc >= 0x80 or ascq >= 0x80:
        return "vendor specific"
    return "unknown additional sense code"


# ----------------------------------------------------------------------------- sense data


@dataclass(frozen=True)
class SenseData:
    """Decoded sense data (either format).

    ``information`` is the INFORMATION field when the device marked it valid (for
    media errors: the first bad LBA), else None.
    """

    response_code: int
    sense_key: int
    asc: int
    ascq: int
    information: int | None = None

    @property
    def descriptor_format(self) -> bool:
        return self.response_code in (0x72, 0x73)

    @property
    def deferred(self) -> bool:
        return self.response_code in (0x71, 0x73)

    @property
    def key_name(self) -> str:
        return SENSE_KEY_NAMES[self.sense_key]

    def describe(self) -> str:
        """``MEDIUM ERROR, ASC/ASCQ 11/00 (unrecovered read error)[, at LBA n]``."""
        text = (
            f"{self.key_name}, ASC/ASCQ {self.asc:02X}/{self.ascq:02X} "
            f"({asc_meaning(self.asc, self.ascq)})"
        )
        if self.deferred:
            text += ", deferred error from an earlier command"
        if self.information is not None and self.sense_key in (MEDIUM_ERROR, HARDWARE_ERROR):
            text += f", at LBA {self.information}"
        return text


def parse_sense(data: bytes | bytearray | memoryview) -> SenseData | None:
    """Decode sense bytes; None when there are none or they are not a known format.

    Truncated sense is decoded as far as it goes (missing ASC/ASCQ read as 0): a device
    that reported CHECK CONDITION still failed the command, whatever its sense says.
    """
    b = bytes(data)
    if not b:
        return None
    code = b[0] & 0x7F
    if code in (0x70, 0x71):
        if len(b) < 3:
            return None
        key = b[2] & 0x0F
        # Bytes 7.. exist only as far as ADDITIONAL SENSE LENGTH and the transfer allow.
        end = min(len(b), 8 + b[7]) if len(b) >= 8 else len(b)
        asc = b[12] if end > 12 else 0
        ascq = b[13] if end > 13 else 0
        information = None
        if b[0] & 0x80 and len(b) >= 7:
            information = struct.unpack_from(">I", b, 3)[0]
        return SenseData(code, key, asc, ascq, information)
    if code in (0x72, 0x73):
        if len(b) < 2:
            return None
        key = b[1] & 0x0F
        asc = b[2] if len(b) > 2 else 0
        ascq = b[3] if len(b) > 3 else 0
        information = None
        if len(b) >= 8:
            end = min(len(b), 8 + b[7])
            offset = 8
            # Bounded walk: every descriptor advances by at least 2 bytes.
            while offset + 2 <= end:
                dtype, dlen = b[offset], b[offset + 1]
                if dtype == 0x00 and dlen >= 0x0A and offset + 12 <= end and b[offset + 2] & 0x80:
                    information = struct.unpack_from(">Q", b, offset + 4)[0]
                offset += 2 + dlen
        return SenseData(code, key, asc, ascq, information)
    return None


def pack_fixed_sense(
    sense_key: int,
    asc: int,
    ascq: int,
    *,
    information: int | None = None,
    deferred: bool = False,
) -> bytes:
    """Fixed-format sense (18 bytes), as devices send it (for fakes and tests)."""
    b = bytearray(18)
    b[0] = (0x71 if deferred else 0x70) | (0x80 if information is not None else 0)
    b[2] = sense_key
    if information is not None:
        struct.pack_into(">I", b, 3, information)
    b[7] = 10
    b[12] = asc
    b[13] = ascq
    return bytes(b)


def pack_descriptor_sense(
    sense_key: int,
    asc: int,
    ascq: int,
    *,
    information: int | None = None,
    deferred: bool = False,
) -> bytes:
    """Descriptor-format sense, with an information descriptor when given."""
    descriptors = b""
    if information is not None:
        descriptors = bytes([0x00, 0x0A, 0x80, 0]) + struct.pack(">Q", information)
    header = bytes([0x73 if deferred else 0x72, sense_key, asc, ascq, 0, 0, 0, len(descriptors)])
    return header + descriptors


# ----------------------------------------------------------------------------- verdicts


class Action(enum.Enum):
    OK = "ok"
    RETRY = "retry"
    FAIL = "fail"


@dataclass(frozen=True)
class Verdict:
    """What to do with one completed command.

    ``error`` is the exception to raise for FAIL, and for RETRY the one to raise when the
    caller's retry budget runs out.  ``delay_s`` is how long to wait before retrying.
    ``sense`` is the decoded sense when there was any (callers look at UNIT ATTENTION
    codes, for instance 2A/09 capacity changed).
    """

    action: Action
    error: DeviceError | None = None
    delay_s: float = 0.0
    sense: SenseData | None = None

    @property
    def unit_attention(self) -> bool:
        return self.sense is not None and self.sense.sense_key == UNIT_ATTENTION


OK = Verdict(Action.OK)


def _fail(error: DeviceError, sense: SenseData | None = None) -> Verdict:
    return Verdict(Action.FAIL, error=error, sense=sense)


def _retry(error: DeviceError, sense: SenseData | None = None, delay_s: float = 0.0) -> Verdict:
    return Verdict(Action.RETRY, error=error, delay_s=delay_s, sense=sense)


def classify(response: int, status: int, sense: bytes, *, what: str) -> Verdict:
    """Judge one completed command.  ``what`` prefixes every message ("disk 0:0 READ(10)
    of blocks 8..15").  Pure: never raises (errors are returned in the verdict)."""
    if response != vt.VIRTIO_SCSI_S_OK:
        name = VIRTIO_RESPONSE_NAMES.get(response, f"unknown response {response}")
        prefix = f"{what}: the virtio-scsi controller answered {name}"
        if response == vt.VIRTIO_SCSI_S_BAD_TARGET:
            return _fail(DeviceGone(f"{prefix}: the target is not there (unplugged?)"))
        if response in (vt.VIRTIO_SCSI_S_RESET, vt.VIRTIO_SCSI_S_ABORTED):
            return _retry(HardwareError(f"{prefix} repeatedly"))
        if response == vt.VIRTIO_SCSI_S_BUSY:
            return _retry(HardwareError(f"{prefix} repeatedly"), delay_s=BUSY_RETRY_DELAY_S)
        return _fail(HardwareError(f"{prefix}"))

    if status in (STATUS_GOOD, STATUS_CONDITION_MET):
        return OK
    if status in (STATUS_BUSY, STATUS_TASK_SET_FULL):
        return _retry(
            HardwareError(f"{what}: the device stayed {STATUS_NAMES[status]}"),
            delay_s=BUSY_RETRY_DELAY_S,
        )
    if status != STATUS_CHECK_CONDITION:
        name = STATUS_NAMES.get(status, f"{status:#04x}")
        return _fail(HardwareError(f"{what}: the device returned SCSI status {name}"))

    parsed = parse_sense(sense)
    if parsed is None:
        return _fail(
            HardwareError(
                f"{what}: CHECK CONDITION without readable sense data ({sense[:18].hex() or 'none'})"
            )
        )
    return _classify_sense(parsed, what)


def _classify_sense(s: SenseData, what: str) -> Verdict:
    message = f"{what} failed: {s.describe()}"
    key = s.sense_key
    if key in (NO_SENSE, RECOVERED_ERROR, COMPLETED):
        return Verdict(Action.OK, sense=s)
    if key == MEDIUM_ERROR:
        return _fail(MediumError(f"{message}; the disk has a bad block"), s)
    if key == DATA_PROTECT:
        return _fail(WriteProtected(f"{message}; the disk is write-protected"), s)
    if key == NOT_READY:
        error = NoMedium(f"{message}; the disk is not ready")
        if s.asc == 0x04 and s.ascq == 0x01:
            return _retry(error, s, delay_s=NOT_READY_RETRY_DELAY_S)
        return _fail(error, s)
    if key == ILLEGAL_REQUEST:
        if s.asc in _INVALID_REQUEST_ASCS:
            return _fail(
                IllegalRequest(f"{message}; the request was invalid", errno=_errno.EINVAL), s
            )
        return _fail(IllegalRequest(f"{message}; the device does not support it"), s)
    if key == UNIT_ATTENTION:
        return _retry(DiskChanged(f"{message}; it kept being reported, the disk changed"), s)
    if key == ABORTED_COMMAND:
        if s.asc == 0x00 and s.ascq == 0x06:
            # QEMU reports a host-side I/O error (EIO on the image) this way.
            return _fail(MediumError(f"{message}; the disk's backing storage failed"), s)
        return _retry(HardwareError(f"{message} repeatedly"), s)
    if key == HARDWARE_ERROR:
        return _fail(HardwareError(f"{message}; the disk is faulty"), s)
    return _fail(HardwareError(message), s)
