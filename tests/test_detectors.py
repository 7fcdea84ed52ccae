"""beamkin.detectors: detector descriptions as detectors and files carry them -> pyFAI definitions.

The descriptions are those of real start messages, EIGER master files and CBF headers. The gap
counts are what the module layout predicts: ny = rows * module_ny + (rows - 1) * gap_y, and the
masked pixels are every pixel outside the modules.
"""
import pytest

from beamkin.detectors import MYTHEN_CHANNELS_PER_MODULE, match_detector

EIGER_PIXEL = 75e-6
PILATUS_PIXEL = 172e-6
PILATUS4_PIXEL = 150e-6


@pytest.mark.parametrize("description, shape, key, pixel", [
    # Stream V2 start message of an EIGER2 Si 16M (detector_description)
    ("Dectris EIGER2 Si 16M", (4362, 4148), "eiger2_16m", EIGER_PIXEL),
    ("Dectris EIGER2 CdTe 9M", None, "eiger2_cdte_9m", EIGER_PIXEL),
    ("Dectris Eiger2 CdTe 4M", None, "eiger2_cdte_4m", EIGER_PIXEL),
    ("Dectris EIGER2 Si 1M, S/N E-02-0299", None, "eiger2_1m", EIGER_PIXEL),
    ("EIGER2 R 500K", None, "eiger2_500k", EIGER_PIXEL),
    ("Dectris EIGER2 X 1M-W", None, "eiger2_1mw", EIGER_PIXEL),
    # EIGER(1) master files: /entry/instrument/detector/description
    ("Dectris Eiger 16M S/N E-32-0108", None, "eiger_16m", EIGER_PIXEL),
    ("Dectris Eiger 4M", (2167, 2070), "eiger_4m", EIGER_PIXEL),
    ("DECTRIS EIGER X 9M", None, "eiger_9m", EIGER_PIXEL),
    ("Dectris Eiger 500K", None, "eiger_500k", EIGER_PIXEL),
    # CBF "# Detector:" lines of PILATUS / PILATUS3
    ("PILATUS3 X 1M", (1043, 981), "pilatus_1m", PILATUS_PIXEL),
    ("PILATUS3 6M, S/N 60-0000", None, "pilatus_6m", PILATUS_PIXEL),
    ("PILATUS3 2M, S/N 24-0126, MAXIV BIOMAX", None, "pilatus_2m", PILATUS_PIXEL),
    ("PILATUS 100K, S/N 60-0100", None, "pilatus_100k", PILATUS_PIXEL),
    ("PILATUS3 X CdTe 300K", None, "pilatus_cdte_300k", PILATUS_PIXEL),
    ("PILATUS 300K-W", None, "pilatus_300kw", PILATUS_PIXEL),
    ("Pilatus 1M", (1043, 981), "pilatus_1m", PILATUS_PIXEL),
    # PILATUS4
    ("Dectris Pilatus4 2M", (1630, 1553), "pilatus4_2m", PILATUS4_PIXEL),
    ("PILATUS4 CdTe 1M", None, "pilatus4_cdte_1m", PILATUS4_PIXEL),
    ("PILATUS4 260K-W", None, "pilatus4_260kw", PILATUS4_PIXEL),
])
def test_descriptions_map_to_pyfai_definitions(description, shape, key, pixel):
    match = match_detector(description, shape)
    assert match is not None and match.pyfai_name == key and match.how == "description"
    assert match.pixel_size_m == (pixel, pixel)
    if shape is not None:
        assert tuple(match.detector.max_shape) == shape


@pytest.mark.parametrize("description, shape, modules, module_shape, gap", [
    ("Dectris EIGER2 Si 16M", (4362, 4148), (8, 4), (512, 1028), (38, 12)),
    ("Dectris Eiger 4M", (2167, 2070), (4, 2), (514, 1030), (37, 10)),
    ("PILATUS3 X 1M", (1043, 981), (5, 2), (195, 487), (17, 7)),
    ("Dectris Pilatus4 2M", (1630, 1553), (6, 3), (255, 513), (20, 7)),
])
def test_module_gaps_come_from_pyfai(description, shape, modules, module_shape, gap):
    rows, cols = modules
    assert shape == (rows * module_shape[0] + (rows - 1) * gap[0], cols * module_shape[1] + (cols - 1) * gap[1])
    mask = match_detector(description, shape).gap_mask(shape)
    assert mask.shape == shape
    assert int(mask.sum()) == shape[0] * shape[1] - rows * cols * module_shape[0] * module_shape[1]
    # the first gap row below the first module row is masked over the full width, the module is not
    assert mask[module_shape[0], :].all() and not mask[: module_shape[0], : module_shape[1]].any()


def test_shape_decides_when_the_text_does_not():
    # a CBF header where the serial number is glued to the size
    match = match_detector("PILATUS 6MF-0109", (2527, 2463))
    assert match.pyfai_name == "pilatus_6m" and match.how == "description family + image shape"
    # an EIGER2 16M read out in its 4M region of interest
    roi = match_detector("Dectris EIGER2 Si 16M", (2162, 2068))
    assert roi.pyfai_name == "eiger2_4m" and roi.gap_mask((2162, 2068)) is not None
    # a shape no definition of the family has: no gaps claimed
    assert match_detector("Dectris EIGER2 Si 16M", (100, 200)) is None


def test_mythen_modules():
    match = match_detector("MYTHEN2 X 1K", (1, 6 * MYTHEN_CHANNELS_PER_MODULE))
    assert match.pyfai_name == "mythen" and match.modules == 6
    assert match.pixel_size_m == (8e-3, 50e-6)      # 8 mm strips at 50 um pitch
    assert match_detector("MYTHEN", None).modules == 1


@pytest.mark.parametrize("description", ["DECTRIS Stream V2 detector", "", None, "cbf files", "EIGER2 17M", 42])
def test_unknown_descriptions_give_none(description):
    assert match_detector(description, (100, 100)) is None
    assert match_detector(description, None) is None
