"""Stream V2 decode-and-forward throughput vs bare cbor2.loads + decompression, same messages, same run.

For a 16M-size (4362 x 4148, EIGER2 X 16M) and a 1M-size (1062 x 1028, EIGER2 X 1M) uint32 frame of
Poisson counts (mean 1 photon/pixel, bslz4 as the detector sends it) this measures:

* baseline: ``cbor2.loads`` with the minimal tag hook of the DECTRIS example client (tag 56500 ->
  ``dectris.compression.decompress``, typed arrays -> ``np.frombuffer``, tag 40 -> reshape);
* beamkin: ``StreamV2Decoder.feed`` (validation, series bookkeeping, beamkin message) followed by
  ``beamkin.protocol.encode`` (the forward step: multipart parts, arrays not copied).

Prints frames/s and MB/s (uncompressed) of both and the ratio beamkin / baseline (target >= 0.9),
as the median over rounds of per-round ratios, from wall time and from process CPU time (the CPU
ratio is the one that counts on a shared machine: time other processes take is not in it). Rounds
alternate the order of the two so drifting machine load affects both alike.
"""

from __future__ import annotations

import logging
import statistics
import sys
import time
from pathlib import Path

import cbor2
import numpy as np
from dectris.compression import decompress

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from beamkin.protocol import encode  # noqa: E402
from simulator.fake_eiger import encode_message, encode_multi_dim, rational  # noqa: E402
from streamer.stream_v2 import StreamV2Decoder  # noqa: E402

SIZES = {"16M": (4362, 4148), "1M": (1062, 1028)}
ROUNDS = 7


def baseline_hook(tag_or_decoder, maybe_tag):
    tag = tag_or_decoder if isinstance(tag_or_decoder, cbor2.CBORTag) else maybe_tag
    if tag.tag == 56500:
        algorithm, elem_size, data = tag.value
        return decompress(data, algorithm, elem_size=elem_size)
    if tag.tag == 70:
        return np.frombuffer(tag.value, dtype="<u4")
    if tag.tag == 40:
        dims, array = tag.value
        return array.reshape(dims)
    return tag


def messages_for(shape, n_frames):
    rng = np.random.default_rng(0)
    image = rng.poisson(1.0, size=shape).astype(np.uint32)
    start = encode_message({"type": "start", "series_id": 1, "series_unique_id": "bench", "channels": ["threshold_1"],
                            "image_size_x": shape[1], "image_size_y": shape[0], "count_time": 0.3, "frame_time": 1 / 3,
                            "number_of_images": n_frames, "beam_center_x": shape[1] / 2, "beam_center_y": shape[0] / 2,
                            "pixel_size_x": 75e-6, "pixel_size_y": 75e-6, "incident_wavelength": 0.8,
                            "detector_translation": [0.0, 0.0, 0.3]})
    data = {"threshold_1": encode_multi_dim(image, "bslz4")}
    frames = [encode_message({"type": "image", "series_id": 1, "series_unique_id": "bench", "image_id": i,
                              "start_time": rational(i / 3), "stop_time": rational(i / 3 + 0.3),
                              "real_time": rational(0.3), "data": data}) for i in range(n_frames)]
    return image, start, frames


def run_baseline(frames):
    """(wall s, CPU s) to decode ``frames`` the bare way."""
    t0, c0 = time.perf_counter(), time.process_time()
    for raw in frames:
        message = cbor2.loads(raw, tag_hook=baseline_hook)
        assert message["data"]["threshold_1"].ndim == 2
    return time.perf_counter() - t0, time.process_time() - c0


def run_beamkin(start, frames):
    decoder = StreamV2Decoder("dectris2:bench")
    decoder.feed(start)
    t0, c0 = time.perf_counter(), time.process_time()
    for raw in frames:
        for message in decoder.feed(raw):
            parts = encode(message)
            assert len(parts) == 3
    return time.perf_counter() - t0, time.process_time() - c0


def main() -> None:
    logging.disable(logging.WARNING)  # the decoder's per-series log lines are not what is measured
    print("Stream V2 decode-and-forward vs bare cbor2.loads + decompression (bslz4, uint32)")
    results = {}
    for name, shape in SIZES.items():
        n_frames = 6 if name == "16M" else 60
        image, start, frames = messages_for(shape, n_frames)
        compressed = len(frames[0])
        run_baseline(frames[:2])
        run_beamkin(start, frames[:2])
        wall_ratios, cpu_ratios, base_walls, ours_walls = [], [], [], []
        for round_number in range(ROUNDS):
            if round_number % 2:  # alternate the order so drifting machine load hits both alike
                ours, base = run_beamkin(start, frames), run_baseline(frames)
            else:
                base, ours = run_baseline(frames), run_beamkin(start, frames)
            base_walls.append(base[0])
            ours_walls.append(ours[0])
            wall_ratios.append(base[0] / ours[0])
            cpu_ratios.append(base[1] / ours[1])
        base = n_frames / statistics.median(base_walls)
        ours = n_frames / statistics.median(ours_walls)
        mb = image.nbytes / 1e6
        results[name] = statistics.median(cpu_ratios)
        print(f"{name:>4} {shape[0]}x{shape[1]} ({mb:.0f} MB raw, {compressed / 1e6:.1f} MB bslz4): "
              f"baseline {base:7.1f} frames/s ({base * mb:5.0f} MB/s) | beamkin {ours:7.1f} frames/s "
              f"({ours * mb:5.0f} MB/s) | ratio wall {statistics.median(wall_ratios):.3f}, "
              f"CPU {statistics.median(cpu_ratios):.3f} (target >= 0.9)")
    print(f"worst ratio (CPU time, median of rounds) {min(results.values()):.3f}")


if __name__ == "__main__":
    main()
