"""The CBOR tags of DECTRIS Stream V2 (github.com/dectris/documentation, stream_v2/README.md and
cbor/dectris-compression-tag.md; RFC 8746 for typed and multi-dimensional arrays): the numbers the
simulator's encoder (simulator.fake_eiger) and the streamer's decoder (streamer.cbor_decode) share.
"""

from __future__ import annotations

import numpy as np

TAG_SELF_DESCRIBE = 55799

TAG_MULTI_DIM_ROW_MAJOR = 40

TAG_HOMOGENEOUS_ARRAY = 41

TAG_MULTI_DIM_COLUMN_MAJOR = 1040

TAG_DECTRIS_COMPRESSION = 56500

TAG_DATETIME = 0


def _typed_array_dtypes() -> dict[int, np.dtype]:
    """RFC 8746 section 2.1: tag 64 + 0b_f_s_e_ll -> numpy dtype (no entry for reserved tag 76)."""
    table: dict[int, np.dtype] = {}
    for ll in range(4):
        for endian, code in ((0, ">"), (1, "<")):
            size = 1 << ll
            table[64 + 4 * endian + ll] = np.dtype(f"{code}u{size}")  # unsigned (68: uint8 clamped)
            if not (ll == 0 and endian == 1):  # 76 would be a little-endian sint8: reserved
                table[72 + 4 * endian + ll] = np.dtype(f"{code}i{size}")
            if ll < 3:
                table[80 + 4 * endian + ll] = np.dtype(f"{code}f{2 * size}")  # binary16/32/64
    return table


TYPED_ARRAY_DTYPES = _typed_array_dtypes()

#: binary128 typed arrays: big-endian 83, little-endian 87 (converted to float64)
BINARY128_TAGS = {83: ">", 87: "<"}

#: tags whose content is (or becomes) an array: an unusable array inside them makes them unusable
ARRAY_TAGS = frozenset(TYPED_ARRAY_DTYPES) | set(BINARY128_TAGS) | {TAG_MULTI_DIM_ROW_MAJOR, TAG_MULTI_DIM_COLUMN_MAJOR,
                                                                      TAG_DECTRIS_COMPRESSION}


#: numpy dtype string ("<u2", "|u1", ...) -> its typed array tag, used by encoders (64, not 68, for uint8)
TAG_FOR_DTYPE = {TYPED_ARRAY_DTYPES[tag].str: tag for tag in sorted(TYPED_ARRAY_DTYPES, reverse=True) if tag != 68}
