"""Sense decoding and command verdicts (amigafuse.driver.scsi.sense)."""

from __future__ import annotations

import errno

import pytest
from hypothesis import given
from hypothesis import strategies as st

from amigafuse.driver.scsi import sense as sn
from amigafuse.driver.scsi import transport as vt
from amigafuse.errors import (
    DeviceGone,
    DiskChanged,
    HardwareError,
    IllegalRequest,
    MediumError,
    NoMedium,
    WriteProtected,
)

keys = st.integers(0, 15)
bytes8 = st.integers(0, 255)
infos = st.one_of(st.none(), st.integers(0, 0xFFFFFFFF))


@given(keys, bytes8, bytes8, infos, st.booleans())
def test_fixed_sense_round_trip(
    key: int, asc: int, ascq: int, info: int | None, deferred: bool
) -> None:
    s = sn.parse_sense(sn.pack_fixed_sense(key, asc, ascq, information=info, deferred=deferred))
    assert s is not None
    assert (s.sense_key, s.asc, s.ascq, s.information) == (key, asc, ascq, info)
    assert s.deferred == deferred and not s.descriptor_format


@given(keys, bytes8, bytes8, st.one_of(st.none(), st.integers(0, (1 << 64) - 1)), st.booleans())
def test_descriptor_sense_round_trip(
    key: int, asc: int, ascq: int, info: int | None, deferred: bool
) -> None:
    s = sn.parse_sense(
        sn.pack_descriptor_sense(key, asc, ascq, information=info, deferred=deferred)
    )
    assert s is not None
    assert (s.sense_key, s.asc, s.ascq, s.information) == (key, asc, ascq, info)
    assert s.deferred == deferred and s.descriptor_format


@given(st.binary(max_size=64))
def test_parse_sense_never_crashes_on_garbage(raw: bytes) -> None:
    s = sn.parse_sense(raw)
    if s is not None:
        assert 0 <= s.sense_key <= 15
        # And classification of garbage never raises either.
        sn.classify(0, sn.STATUS_CHECK_CONDITION, raw, what="X")


def test_truncated_fixed_sense() -> None:
    full = sn.pack_fixed_sense(sn.MEDIUM_ERROR, 0x11, 0x00)
    s = sn.parse_sense(full[:8])
    assert s is not None and s.sense_key == sn.MEDIUM_ERROR and (s.asc, s.ascq) == (0, 0)
    assert sn.parse_sense(full[:2]) is None
    assert sn.parse_sense(b"") is None
    assert sn.parse_sense(b"\x10\x00\x05") is None  # unknown response code


def _check(key: int, asc: int, ascq: int) -> sn.Verdict:
    return sn.classify(
        vt.VIRTIO_SCSI_S_OK,
        sn.STATUS_CHECK_CONDITION,
        sn.pack_fixed_sense(key, asc, ascq),
        what="disk 0:0 READ(10) of blocks 8..15",
    )


@pytest.mark.parametrize(
    "key,asc,ascq,cls,err,words",
    [
        (sn.MEDIUM_ERROR, 0x11, 0x00, MediumError, errno.EIO, "unrecovered read error"),
        (sn.DATA_PROTECT, 0x27, 0x00, WriteProtected, errno.EROFS, "write protected"),
        (sn.NOT_READY, 0x3A, 0x00, NoMedium, errno.ENOMEDIUM, "medium not present"),
        (sn.ILLEGAL_REQUEST, 0x20, 0x00, IllegalRequest, errno.EIO, "invalid command operation"),
        (sn.ILLEGAL_REQUEST, 0x21, 0x00, IllegalRequest, errno.EINVAL, "out of range"),
        (sn.ILLEGAL_REQUEST, 0x24, 0x00, IllegalRequest, errno.EINVAL, "invalid field in CDB"),
        (sn.HARDWARE_ERROR, 0x44, 0x00, HardwareError, errno.EIO, "internal target failure"),
        (sn.ABORTED_COMMAND, 0x00, 0x06, MediumError, errno.EIO, "I/O process terminated"),
        (sn.MISCOMPARE, 0x1D, 0x00, HardwareError, errno.EIO, "MISCOMPARE"),
    ],
)
def test_sense_key_mapping(key: int, asc: int, ascq: int, cls: type, err: int, words: str) -> None:
    v = _check(key, asc, ascq)
    assert v.action is sn.Action.FAIL
    assert type(v.error) is cls and v.error.errno == err
    msg = v.error.message
    assert words in msg
    assert "disk 0:0 READ(10) of blocks 8..15" in msg
    assert sn.SENSE_KEY_NAMES[key] in msg and f"{asc:02X}/{ascq:02X}" in msg


@pytest.mark.parametrize(
    "asc,ascq,meaning",
    [(0x29, 0x00, "power on"), (0x3F, 0x0E, "reported LUNs"), (0x2A, 0x09, "capacity data")],
)
def test_unit_attention_is_retryable(asc: int, ascq: int, meaning: str) -> None:
    v = _check(sn.UNIT_ATTENTION, asc, ascq)
    assert v.action is sn.Action.RETRY and v.unit_attention
    assert v.sense is not None and (v.sense.asc, v.sense.ascq) == (asc, ascq)
    assert isinstance(v.error, DiskChanged) and meaning in v.error.message


def test_not_ready_becoming_ready_retries_after_a_pause() -> None:
    v = _check(sn.NOT_READY, 0x04, 0x01)
    assert v.action is sn.Action.RETRY and v.delay_s > 0 and isinstance(v.error, NoMedium)


def test_recovered_and_no_sense_are_success() -> None:
    assert _check(sn.RECOVERED_ERROR, 0x17, 0x01).action is sn.Action.OK
    assert _check(sn.NO_SENSE, 0, 0).action is sn.Action.OK


def test_media_error_names_lba() -> None:
    raw = sn.pack_descriptor_sense(sn.MEDIUM_ERROR, 0x11, 0, information=1 << 33)
    v = sn.classify(0, sn.STATUS_CHECK_CONDITION, raw, what="W")
    assert isinstance(v.error, MediumError) and f"at LBA {1 << 33}" in v.error.message


def test_status_and_response_codes() -> None:
    assert sn.classify(0, 0, b"", what="x") is sn.OK
    busy = sn.classify(0, sn.STATUS_BUSY, b"", what="x")
    assert busy.action is sn.Action.RETRY and busy.delay_s > 0
    rc = sn.classify(0, sn.STATUS_RESERVATION_CONFLICT, b"", what="x")
    assert rc.action is sn.Action.FAIL and "RESERVATION CONFLICT" in str(rc.error)
    nos = sn.classify(0, sn.STATUS_CHECK_CONDITION, b"", what="x")
    assert isinstance(nos.error, HardwareError) and "without readable sense" in str(nos.error)
    gone = sn.classify(vt.VIRTIO_SCSI_S_BAD_TARGET, 0, b"", what="x")
    assert gone.action is sn.Action.FAIL and isinstance(gone.error, DeviceGone)
    assert "BAD_TARGET" in str(gone.error)
    assert sn.classify(vt.VIRTIO_SCSI_S_RESET, 0, b"", what="x").action is sn.Action.RETRY
    assert sn.classify(vt.VIRTIO_SCSI_S_BUSY, 0, b"", what="x").delay_s > 0
    tf = sn.classify(vt.VIRTIO_SCSI_S_TRANSPORT_FAILURE, 0, b"", what="x")
    assert isinstance(tf.error, HardwareError) and "TRANSPORT_FAILURE" in str(tf.error)
    odd = sn.classify(99, 0, b"", what="x")
    assert isinstance(odd.error, HardwareError) and "unknown response 99" in str(odd.error)


def test_asc_meaning_fallbacks() -> None:
    assert sn.asc_meaning(0x80, 0) == "vendor specific"
    assert sn.asc_meaning(0x70, 0x01) == "unknown additional sense code"
