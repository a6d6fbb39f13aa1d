"""Zero-shot text-video retrieval (``llave-fast eval-video``): frame sampling, decoding, token
counts and layout, annotation readers, metrics, and the command end to end on the tiny model.

Videos are written here with PyAV: a coloured square moving right over black, 64 x 64 px.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import sys

import numpy as np
import pytest
import torch

av = pytest.importorskip("av")

from _helpers import run_cli as _main  # noqa: E402
from llave_fast.model import build_tiny_model  # noqa: E402
from llave_fast.testing import write_clip  # noqa: E402
from llave_fast.model import video as mv  # noqa: E402
from llave_fast.eval_video import (  # noqa: E402
    VideoDataError,
    decode_video,
    encode_videos,
    find_videos,
    read_annotations,
    retrieval_metrics,
    sample_frame_indices,
)

SIZE = 64
STEP = 3  # px the square moves a frame


def make_video(path, num_frames: int, fps, colour=(255, 40, 0)) -> str:
    """A clip of ``num_frames`` frames at ``fps``: a 16-px square moving STEP px right a frame."""
    return write_clip(path, num_frames, fps, colour, step=STEP, size=SIZE)


def square_x(frame: np.ndarray) -> int:
    """Left edge of the bright square in a decoded frame (columns where the middle rows are bright)."""
    bright = frame[28:36].astype(np.float32).sum(axis=(0, 2)) > 8 * 200
    return int(np.flatnonzero(bright)[0])


# ------------------------------------------------------------------------------ frame sampling
@pytest.mark.parametrize("num_frames, native_fps, kwargs, expected", [
    (300, 30, {}, list(range(0, 300, 10))),              # every 10th frame: 30 <= 32, kept as they are
    (20, 6, {"max_frames": 4}, [0, 6, 12, 19]),          # every 2nd: 10 > 4 -> linspace(0, 19, 4) = 0, 6.33, 12.67, 19
    (10, 7.5, {}, [0, 2, 4, 6, 8]),                      # 7.5 / 3 = 2.5 rounds to 2 (halves to even, as LLaVE's round)
    (10, 10.5, {}, [0, 4, 8]),                           # 3.5 rounds to 4
    (5, 1.0, {}, [0, 1, 2, 3, 4]),                       # round(1/3) = 0: every frame (LLaVE's code divides by 0)
    (1, 30, {}, [0]),
    (12, 6, {"fps": 1}, [0, 6]),                         # 1 fps: every 6th
])
def test_sample_frame_indices_by_hand(num_frames, native_fps, kwargs, expected):
    assert sample_frame_indices(num_frames, native_fps, **kwargs) == expected


def test_sample_frame_indices_caps_at_32_spread_over_the_clip():
    # 450 frames at 30 fps: 45 frames at 3 fps > 32, so 32 indices floor(k * 449 / 31)
    idx = sample_frame_indices(450, 30)
    assert len(idx) == 32 and idx[:4] == [0, 14, 28, 43] and idx[-2:] == [434, 449]
    # 100 frames at 7.5 fps: step 2, 50 > 32 -> floor(k * 99 / 31): 0, 3, 6, 9, 12, 15, 19, ...
    assert sample_frame_indices(100, 7.5)[:7] == [0, 3, 6, 9, 12, 15, 19]
    # exactly 32 at 3 fps stays: 96 frames at 9 fps, every 3rd
    assert sample_frame_indices(96, 9) == list(range(0, 96, 3))


@pytest.mark.parametrize("args, needle", [
    ((0, 30), "num_frames"), ((10, 0), "native_fps"), ((10, float("nan")), "native_fps"),
    ((10, 30, 0), "fps"), ((10, 30, 3, 0), "max_frames"),
])
def test_sample_frame_indices_refuses_bad_arguments(args, needle):
    with pytest.raises(ValueError, match=needle):
        sample_frame_indices(*args)


# ------------------------------------------------------------------------------ decoding
@pytest.mark.parametrize("ext, num_frames, fps", [("mp4", 12, 6), ("avi", 16, 25), ("mkv", 10, 7.5)])
def test_decode_takes_llaves_frames(tmp_path, ext, num_frames, fps):
    path = make_video(tmp_path / f"clip.{ext}", num_frames, fps)
    frames, info = decode_video(path)
    want = sample_frame_indices(num_frames, fps)
    assert info["num_frames"] == num_frames and info["native_fps"] == pytest.approx(fps)
    assert info["indices"] == want
    assert frames.dtype == np.uint8 and frames.shape == (len(want), SIZE, SIZE, 3)
    # the frames are the right ones: the square sits where frame `index` drew it (lossy codec: +-2 px)
    for f, i in zip(frames, want):
        assert abs(square_x(f) - i * STEP) <= 2, (i, square_x(f))


def test_decode_caps_frames_and_errors_name_the_file(tmp_path, monkeypatch):
    path = make_video(tmp_path / "long.mp4", 16, 25)
    frames, info = decode_video(path, fps=25, max_frames=5)  # every frame at 25 fps: 16 > 5 -> linspace
    assert info["indices"] == [0, 3, 7, 11, 15] and len(frames) == 5
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"this is not a video" * 20)
    with pytest.raises(VideoDataError, match="broken.mp4: cannot be decoded as a video"):
        decode_video(str(bad))
    with pytest.raises(FileNotFoundError, match="nope.mp4"):
        decode_video(str(tmp_path / "nope.mp4"))
    monkeypatch.setitem(sys.modules, "av", None)  # PyAV not installed
    with pytest.raises(ImportError, match=r'pip install "llave-fast\[video\]"'):
        decode_video(path)


# ------------------------------------------------------------------------------ tokens and layout
def test_token_counts_tiny_llave_and_odd_geometry():
    # LLaVE: 384-px tiles, 14-px patches -> 27 x 27 -> pooled 14 x 14 -> 14 x 15 = 210 a frame
    assert mv.pooled_grid(384, 14) == (14, 14)
    assert mv.tokens_per_frame(384, 14) == 210
    assert mv.count_video_tokens(32, image_size=384, patch_size=14) == 6720
    # the tiny model: 32-px tiles of 8-px patches -> 4 x 4 -> 2 x 2 -> 2 x 3 = 6 a frame
    assert mv.tokens_per_frame(32, 8) == 6 and mv.count_video_tokens(5, image_size=32, patch_size=8) == 30
    # an odd map: 5 x 5 -> ceil -> 3 x 3 -> 3 x 4 = 12
    assert mv.tokens_per_frame(40, 8) == 12
    with pytest.raises(ValueError, match="num_frames"):
        mv.count_video_tokens(0, image_size=384, patch_size=14)
    assert mv.CAPTION_PROMPT == "Find me an video that matches the given caption: "  # LLaVE's wording
    assert mv.VIDEO_PROMPT == "<image>\nRepresent the given video."


def _llave_video_tokens(model, pixel):
    """LLaVE's own video path, written out: vision tower + projector per frame, get_2dPool (bilinear,
    ceil(h/2) x ceil(w/2)), add_token_per_grid (image_newline after every row of every frame)."""
    m = model.model
    cfg = m.config
    hidden = m.vision_tower(pixel, output_hidden_states=True).hidden_states[cfg.vision_feature_layer]
    feats = m.multi_modal_projector(hidden)
    n = cfg.vision_config.image_size // cfg.vision_config.patch_size
    frames, _, dim = feats.shape
    x = feats.view(frames, n, n, dim).permute(0, 3, 1, 2)
    x = torch.nn.functional.interpolate(x, size=[math.ceil(n / 2), math.ceil(n / 2)], mode="bilinear")
    h = x.shape[2]
    x = x.permute(0, 2, 3, 1).reshape(frames, 1, h, h, dim).permute(4, 0, 2, 1, 3).flatten(1, 2).flatten(2, 3)
    x = torch.cat([x, m.image_newline[:, None, None].expand(*x.shape[:-1], 1)], dim=-1)
    return x.flatten(1, 2).transpose(0, 1)


@pytest.mark.parametrize("image_size", [32, 40])
def test_video_tokens_follow_llaves_layout(image_size):
    model = build_tiny_model(image_size=image_size).eval()
    rng = np.random.RandomState(0)
    frames = rng.randint(0, 256, (5, 48, 80, 3), dtype=np.uint8)
    pixel = mv.frames_to_pixels(model.processor, frames)
    assert pixel.shape == (5, 3, image_size, image_size)
    with torch.no_grad():
        ours = mv.video_features(model.model, pixel, [5])[0]
        want = _llave_video_tokens(model, pixel)
    assert ours.shape == (mv.count_video_tokens(5, image_size=image_size, patch_size=8), want.shape[1])
    torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-6)


def test_video_batch_prompt_padding_and_length_refusal():
    model = build_tiny_model().eval()
    proc = model.processor
    rng = np.random.RandomState(1)
    a = mv.frames_to_pixels(proc, rng.randint(0, 256, (4, 64, 64, 3), dtype=np.uint8))
    b = mv.frames_to_pixels(proc, rng.randint(0, 256, (2, 64, 64, 3), dtype=np.uint8))
    batch = mv.video_batch(proc, [a, b])
    ids = batch["input_ids"]
    n_img = (ids == proc.image_token_id).sum(dim=1).tolist()
    assert n_img == [4 * 6, 2 * 6]
    # the rest of the row is the image prompt's template around "Represent the given video."
    prompt = proc.build_prompt(mv.VIDEO_PROMPT, True)
    text_ids = [t for t in ids[0].tolist() if t != proc.image_token_id]
    assert proc.tokenizer.decode(text_ids).replace(" ", "") == prompt.replace("<image>", "").replace(" ", "").lower()
    assert batch["attention_mask"].sum(dim=1).tolist() == [24 + mv.video_prompt_tokens(proc), 12 + mv.video_prompt_tokens(proc)]
    with torch.no_grad():
        e_both = mv.embed_video_batch(model, batch)
        e_left = mv.embed_video_batch(model, mv.video_batch(proc, [b, a], padding_side="left"))
        e_one = mv.embed_video_batch(model, mv.video_batch(proc, [b]))
    assert e_both.shape == (2, model.embed_dim)
    torch.testing.assert_close(e_both.norm(dim=1), torch.ones(2))
    torch.testing.assert_close(e_both[1], e_one[0], rtol=1e-4, atol=1e-5)  # padding and batch do not matter
    torch.testing.assert_close(e_left[0], e_one[0], rtol=1e-4, atol=1e-5)
    assert (e_both[0] - e_both[1]).abs().max() > 1e-4  # different videos, different embeddings
    # too long: refused with the numbers and what to do
    p = mv.video_prompt_tokens(proc)
    with pytest.raises(ValueError, match=rf"4 x 6 visual tokens per frame \+ {p} prompt tokens = {24 + p} tokens.*"
                                         rf"lower --max-frames to {(40 - p) // 6} or less"):
        mv.video_batch(proc, [a], max_length=40)
    # the limit is also the language model's: the tiny one has 4096 positions
    assert mv.video_length_limit(model.config, 8192) == 4096 and mv.video_length_limit(model.config, 100) == 100
    # LLaVE's geometry fits 32 frames in its 8192 with room for a prompt of this size
    assert mv.count_video_tokens(32, image_size=384, patch_size=14) + p <= mv.LLAVE_VIDEO_MAX_LENGTH


# ------------------------------------------------------------------------------ annotations
def test_msrvtt_csv_and_record_layouts(tmp_path):
    csv_path = tmp_path / "MSRVTT_JSFUSION_test.csv"
    csv_path.write_text("key,vid_key,video_id,sentence\n"
                        "ret0,msr7579,video7579,a girl wearing red top and black trouser is putting a sweater on\n"
                        "ret1,msr7725,video7725,\"young people sit around the edges of a room, clapping\"\n")
    ann = read_annotations(str(csv_path))
    assert ann.video_ids == ["video7579", "video7725"] and ann.caption_to_video == [0, 1]
    assert ann.captions[1] == "young people sit around the edges of a room, clapping" and not ann.multi_caption
    # MSR-VTT's videodatainfo json, records with file names, and json lines read the same way
    info = tmp_path / "test_videodatainfo.json"
    info.write_text(json.dumps({"videos": [{"video_id": "video7579"}], "sentences": [
        {"caption": "a girl puts a sweater on", "video_id": "video7579", "sen_id": 1},
        {"caption": "a woman dresses", "video_id": "video7579", "sen_id": 2}]}))
    ann = read_annotations(str(info))
    assert ann.video_ids == ["video7579"] and ann.num_captions == 2 and ann.multi_caption
    recs = tmp_path / "ret_test.json"
    recs.write_text(json.dumps([{"video": "video9770.mp4", "caption": "a man plays guitar"},
                                {"video": "video9771.mp4", "caption": ["a cat", "a cat jumps"]}]))
    ann = read_annotations(str(recs))
    assert ann.video_ids == ["video9770", "video9771"] and ann.caption_to_video == [0, 1, 1]
    lines = tmp_path / "ret.jsonl"
    lines.write_text('{"video_id": "v1", "sentence": "one"}\n\n{"video_id": "v2", "sentence": "two"}\n')
    assert read_annotations(str(lines)).captions == ["one", "two"]


def test_msvd_layouts(tmp_path):
    caps = {"-4wsuPCjDBc_5_15": ["a squirrel is eating a peanut", "a chipmunk eats"], "-7KMZQEsJW4_205_208": ["a man sings"]}
    js = tmp_path / "msvd_test.json"
    js.write_text(json.dumps(caps))
    ann = read_annotations(str(js))
    assert ann.video_ids == list(caps) and ann.caption_to_video == [0, 0, 1] and ann.multi_caption
    txt = tmp_path / "annotations.txt"
    txt.write_text("-4wsuPCjDBc_5_15 a squirrel is eating a peanut\n-4wsuPCjDBc_5_15 a chipmunk eats\n\n"
                   "-7KMZQEsJW4_205_208 a man sings\n")
    assert read_annotations(str(txt)).captions == ann.captions
    # CLIP4Clip's msvd_data folder (what LLaVE's command reads): word-list captions + the test list
    folder = tmp_path / "msvd_data"
    folder.mkdir()
    with open(folder / "raw-captions.pkl", "wb") as f:
        pickle.dump({k: [c.split() for c in v] for k, v in caps.items()} | {"train_vid": [["x"]]}, f)
    (folder / "test_list.txt").write_text("-7KMZQEsJW4_205_208\n-4wsuPCjDBc_5_15\n")
    ann = read_annotations(str(folder))
    assert ann.video_ids == ["-7KMZQEsJW4_205_208", "-4wsuPCjDBc_5_15"]  # the list's order
    assert ann.captions == ["a man sings", "a squirrel is eating a peanut", "a chipmunk eats"]
    assert ann.caption_to_video == [0, 1, 1]
    # --video-list on any file
    vl = tmp_path / "test_list.txt"
    vl.write_text("-7KMZQEsJW4_205_208\n")
    assert read_annotations(str(js), str(vl)).captions == ["a man sings"]
    vl.write_text("-7KMZQEsJW4_205_208\nnot_there\n")
    with pytest.raises(VideoDataError, match=r"test_list.txt: 1 of its 2 videos have no caption.*'not_there'"):
        read_annotations(str(js), str(vl))
    vl.write_text("-7KMZQEsJW4_205_208\n\n-7KMZQEsJW4_205_208\n")  # was dropped silently: 2 ids gave 1 video
    with pytest.raises(VideoDataError, match=r"test_list.txt:3: names video '-7KMZQEsJW4_205_208' twice \(lines 1 "
                                             r"and 3\)"):
        read_annotations(str(js), str(vl))


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.mark.parametrize("name, content, needle", [
    ("a.csv", "key,vid,text_\n1,2,3\n", r"a.csv:1: the header row has columns \['key', 'vid', 'text_'\]; "
                                        r"expected a video id column"),
    ("b.csv", "video_id,sentence\nvideo1,hello\nvideo2\n", r"b.csv:3: has 1 cells"),
    ("b2.csv", 'video_id,sentence\nvideo1,"a square, left"\nvideo2,a green square, moving left, fast\n',
     r"b2.csv:3: has 4 cells, more than the 2 columns .*\[' moving left', ' fast'\].*quote a caption"),
    ("b3.csv", "video_id,sentence\nvideo1,red,\nvideo2,blue,,\n", None),  # trailing commas: empty cells, fine
    ("c.csv", "video_id,sentence\nvideo1,   \n", r"c.csv:2: the caption of video 'video1' is empty"),
    ("c2.csv", "video_id,sentence\nvideo1,red\nvideo4,yellow <|image_1|> square\n",
     r"c2.csv:3: the caption of video 'video4' holds an image placeholder"),
    ("d.json", json.dumps([{"video_id": "v1", "caption": "x"}, {"video_id": "v2"}]),
     r"d.json: row 2: expected a caption field \(one of sentence, caption"),
    ("e.json", json.dumps({"v1": 3}), r"e.json: row 1: expected a caption \(a string\) or a list of captions, got 3"),
    ("f.json", "[1, 2", r"f.json: is not valid JSON"),
    ("g.txt", "video1 a caption\nvideo2\n", r"g.txt:2: expected '<video id> <caption>'"),
    ("h.xml", "<a/>", r"h.xml: has the extension '.xml'; expected an annotation file .csv, .json"),
    ("i.jsonl", '{"video_id": "v", "caption": "c"}\nnot json\n', r"i.jsonl:2: is not valid JSON"),
    ("j.json", json.dumps([{"video_id": "", "caption": "c"}]), r"j.json: row 1: the video id is empty"),
])
def test_bad_annotations_name_file_row_and_expectation(tmp_path, name, content, needle):
    path = tmp_path / name
    path.write_text(content)
    if needle is None:
        assert read_annotations(str(path)).captions == ["red", "blue"]
        return
    with pytest.raises(VideoDataError, match=needle):
        read_annotations(str(path))


def test_caption_pickles_load_plain_data_only(tmp_path):
    path = tmp_path / "raw-captions.pkl"
    path.write_bytes(pickle.dumps({"v": _Evil()}))
    with pytest.raises(VideoDataError, match=r"raw-captions.pkl: is not a captions pickle .*refusing to load"):
        read_annotations(str(path))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(VideoDataError, match="without CLIP4Clip's MSVD files"):
        read_annotations(str(empty))


def test_find_videos_extensions_subfolders_and_missing(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("video1.mp4", "video2.avi", "sub/clip_3.webm", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    got = find_videos(["video2", "clip_3", "video1"], str(tmp_path))
    assert got == [str(tmp_path / "video2.avi"), str(tmp_path / "sub" / "clip_3.webm"), str(tmp_path / "video1.mp4")]
    with pytest.raises(FileNotFoundError, match=r"3 of 4 videos have no file in .*first missing: 'a', 'b', 'notes'"):
        find_videos(["a", "video1", "b", "notes"], str(tmp_path))


# ------------------------------------------------------------------------------ metrics
def test_metrics_one_caption_per_video_with_a_tie():
    sim = [[0.9, 0.1, 0.3],
           [0.5, 0.4, 0.6],
           [0.2, 0.7, 0.7]]
    m = retrieval_metrics(np.array(sim), [0, 1, 2])
    # t2v ranks: 1; 3 (0.5 and 0.6 beat 0.4); 2 (0.7 ties 0.7: a tie counts against the query)
    assert m["t2v"] == {"R@1": pytest.approx(100 / 3), "R@5": 100.0, "R@10": 100.0, "median_rank": 2.0,
                        "mean_rank": 2.0, "num_queries": 3}
    # v2t (the transpose): video 0: 1; video 1: 2 (caption 2's 0.7 beats 0.4); video 2: 1
    assert m["v2t"] == {"R@1": pytest.approx(200 / 3), "R@5": 100.0, "R@10": 100.0, "median_rank": 1.0,
                        "mean_rank": pytest.approx(4 / 3), "num_queries": 3}


def test_metrics_several_captions_per_video():
    sim = torch.tensor([[0.8, 0.2, 0.1],    # caption 0 -> video 0: rank 1
                        [0.3, 0.5, 0.4],    # caption 1 -> video 0: rank 3
                        [0.6, 0.6, 0.0],    # caption 2 -> video 1: rank 2 (tie)
                        [0.85, 0.2, 0.9],   # caption 3 -> video 2: rank 1
                        [0.9, 0.65, 0.5]])  # caption 4 -> video 2: rank 3
    m = retrieval_metrics(sim, [0, 0, 1, 2, 2])
    assert m["t2v"]["R@1"] == pytest.approx(40.0) and m["t2v"]["median_rank"] == 2.0
    assert m["t2v"]["mean_rank"] == pytest.approx(2.0) and m["t2v"]["num_queries"] == 5
    # v2t: a caption set scores its best caption. Video 0: sets (0.8, 0.6, 0.9) -> 2 (caption set 2's 0.9;
    # ranking single captions would give 3, as captions 3 and 4 both beat 0.8); video 1: (0.5, 0.6, 0.65) -> 2;
    # video 2: (0.4, 0.0, 0.9) -> 1
    assert m["v2t"]["R@1"] == pytest.approx(100 / 3) and m["v2t"]["median_rank"] == 2.0
    assert m["v2t"]["mean_rank"] == pytest.approx(5 / 3) and m["v2t"]["num_queries"] == 3


def test_metrics_recall_thresholds_constant_scores_and_errors():
    V = 12
    i, j = np.meshgrid(np.arange(V), np.arange(V), indexing="ij")
    sim = np.where(j < i, 1.0, np.where(j == i, 0.5, 0.0))  # caption i's video ranks i + 1
    m = retrieval_metrics(sim, list(range(V)))
    for key in ("t2v", "v2t"):  # v2t: video j ranks 12 - j, the same spread
        assert m[key]["R@1"] == pytest.approx(100 / 12) and m[key]["R@5"] == pytest.approx(500 / 12)
        assert m[key]["R@10"] == pytest.approx(1000 / 12) and m[key]["median_rank"] == 6.5
        assert m[key]["mean_rank"] == 6.5
    flat = retrieval_metrics(np.zeros((4, 4)), [0, 1, 2, 3])  # everything alike: the worst rank, not the best
    assert flat["t2v"]["R@1"] == 0.0 and flat["t2v"]["median_rank"] == 4.0
    assert flat["v2t"]["R@1"] == 0.0 and flat["v2t"]["median_rank"] == 4.0  # both directions
    with pytest.raises(ValueError, match=r"videos \[1\] have no caption"):
        retrieval_metrics(np.zeros((2, 2)), [0, 0])
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(np.array([[np.nan, 0.0], [0.0, 1.0]]), [0, 1])
    with pytest.raises(ValueError, match="one int per caption"):
        retrieval_metrics(np.zeros((3, 2)), [0, 1])


# ------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("video_model") / "tiny"
    build_tiny_model().save_pretrained(str(folder))
    return str(folder)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    specs = [("video0", "mp4", 12, 6, (255, 40, 0)), ("video1", "avi", 16, 25, (0, 255, 60)),
             ("video2", "mp4", 9, 10, (40, 80, 255)), ("video3", "mkv", 14, 15, (250, 250, 250))]
    # eight more, so that R@5 and R@10 of the end-to-end test are not 100 % whatever the scores
    specs += [(f"video{k}", "mp4", 6 + k % 4, 6, colour) for k, colour in enumerate(EXTRA_COLOURS, start=4)]
    for vid, ext, n, fps, colour in specs:
        make_video(root / f"{vid}.{ext}", n, fps, colour)
    return str(root)


EXTRA_COLOURS = [(255, 255, 0), (255, 0, 255), (0, 255, 255), (128, 64, 0), (90, 90, 90), (255, 128, 128),
                 (0, 100, 0), (160, 0, 255)]
COLOUR_NAMES = ["red", "green", "blue", "white", "yellow", "magenta", "cyan", "brown", "grey", "pink", "dark green",
                "violet"]




def _ranks_by_hand(sim, caption_to_video):
    """(t2v, v2t) 1-based ranks of a (captions x videos) score list, written out with loops (not the
    library's code): t2v ranks a caption's own video among the videos, v2t a video's own caption set
    among the sets, a set scoring as its best caption; ties count against the query. Also the
    smallest gap between the right score and another: near zero, two computations could disagree."""
    C, V = len(sim), len(sim[0])
    t2v, gaps = [], []
    for i in range(C):
        right = sim[i][caption_to_video[i]]
        others = [sim[i][j] for j in range(V) if j != caption_to_video[i]]
        t2v.append(1 + sum(x >= right for x in others))
        gaps += [abs(x - right) for x in others]
    v2t = []
    for v in range(V):
        sets = [max(sim[i][v] for i in range(C) if caption_to_video[i] == g) for g in range(V)]
        v2t.append(1 + sum(sets[g] >= sets[v] for g in range(V) if g != v))
        gaps += [abs(sets[g] - sets[v]) for g in range(V) if g != v]
    return t2v, v2t, min(gaps)


def _summary_by_hand(ranks):
    import statistics

    n = len(ranks)
    return {"R@1": 100.0 * sum(r <= 1 for r in ranks) / n, "R@5": 100.0 * sum(r <= 5 for r in ranks) / n,
            "R@10": 100.0 * sum(r <= 10 for r in ranks) / n, "median_rank": float(statistics.median(ranks)),
            "mean_rank": sum(ranks) / n, "num_queries": n}


def _direct_scores(folder, paths, captions, max_frames=32):
    """Cosine scores (captions x videos) from the model's own entry points (Python API, not eval-video's
    pipeline): LLaVEEmbedder.encode_videos on decoded frames, encode with the caption prompt."""
    from llave_fast.model import LLaVEEmbedder

    model = LLaVEEmbedder.from_pretrained(folder).eval()
    v = model.encode_videos([decode_video(p, max_frames=max_frames)[0] for p in paths], batch_size=5)
    c = model.encode([mv.CAPTION_PROMPT + cap for cap in captions], batch_size=5)
    return (c.double() @ v.double().t()).tolist()


def _check_against_direct(res, folder, paths, captions, caption_to_video, max_frames=32):
    sim = _direct_scores(folder, paths, captions, max_frames)
    t2v, v2t, gap = _ranks_by_hand(sim, caption_to_video)
    # the two computations' scores differ by about 3e-7 (fp32, other batches): a gap well above that decides
    assert gap > 1e-5, f"a near-tie ({gap:.2e}): the direct computation cannot decide the ranks"
    for key, ranks in (("t2v", t2v), ("v2t", v2t)):
        # equal up to float rounding (100 * mean vs 100 * count / n); one query more or less is 100 / n apart
        assert res[key] == pytest.approx(_summary_by_hand(ranks), rel=1e-12, abs=1e-12), (key, ranks)
    return t2v, v2t


def test_eval_video_cli_end_to_end(tiny_folder, clips, tmp_path, capsys):
    V = len(COLOUR_NAMES)
    ids = [f"video{i}" for i in range(V)]
    captions = [f"a {c} square moves right" for c in COLOUR_NAMES]
    csv_path = tmp_path / "MSRVTT_JSFUSION_test.csv"
    csv_path.write_text("key,vid_key,video_id,sentence\n" + "".join(
        f"ret{i},msr{i},{vid},{cap}\n" for i, (vid, cap) in enumerate(zip(ids, captions))))
    out = tmp_path / "msrvtt"
    rc, stdout, err = _main(capsys, "eval-video", "--model", tiny_folder, "--videos", clips, "--annotations",
                            str(csv_path), "--output-dir", str(out), "--batch", "3", "--device", "cpu")
    assert rc == 0, err
    res = json.loads((out / "video_eval.json").read_text())
    assert res["num_videos"] == V and res["num_captions"] == V and res["device"] == "cpu" and res["dtype"] == "float32"
    # every metric equals the one computed here from the model's own embeddings, ranked by hand
    t2v, v2t = _check_against_direct(res, tiny_folder, find_videos(ids, clips), captions, list(range(V)))
    assert max(t2v) > 5 and max(v2t) > 5, "R@5 would be 100 % whatever the code computed: add videos"
    # the frames each clip gave (3 fps; clip 1 at 25 fps: every 8th of 16 frames -> 2)
    assert res["frames"]["min_frames"] == 2 and res["frames"]["max_frames_used"] == 6
    assert res["frames"]["tokens_per_frame"] == 6 and res["frames"]["max_video_tokens"] == 32 * 6
    table = stdout.splitlines()
    row = next(ln for ln in table if ln.startswith("text->video")).split()
    assert [float(x) for x in row[1:6]] == [round(res["t2v"][k], 1) for k in ("R@1", "R@5", "R@10", "median_rank",
                                                                             "mean_rank")]
    assert any(ln.startswith("video->text") for ln in table) and "R@1 %" in stdout

    # MSVD style: several captions a video, a json mapping; v2t ranks each video's caption set
    msvd = {"video0": ["a red square", "red moving"], "video2": ["blue"], "video3": ["white", "a", "b"],
            "video5": ["magenta"], "video6": ["cyan", "a cyan square"], "video8": ["grey"], "video9": ["pink"],
            "video11": ["violet", "moves right"]}
    js = tmp_path / "msvd.json"
    js.write_text(json.dumps(msvd))
    out2 = tmp_path / "msvd"
    rc, stdout, err = _main(capsys, "eval-video", "--model", tiny_folder, "--videos", clips, "--annotations", str(js),
                            "--output-dir", str(out2), "--batch", "2", "--device", "cpu", "--max-frames", "4")
    assert rc == 0, err
    res2 = json.loads((out2 / "video_eval.json").read_text())
    caps = [c for cs in msvd.values() for c in cs]
    c2v = [k for k, cs in enumerate(msvd.values()) for _ in cs]
    assert res2["num_videos"] == len(msvd) and res2["num_captions"] == len(caps)
    _check_against_direct(res2, tiny_folder, find_videos(list(msvd), clips), caps, c2v, max_frames=4)
    assert res2["frames"]["max_frames_used"] == 4


def test_video_embeddings_do_not_depend_on_the_batch(tiny_folder, clips):
    from llave_fast.model import LLaVEEmbedder

    model = LLaVEEmbedder.from_pretrained(tiny_folder).eval()
    paths = find_videos(["video0", "video1", "video2"], clips)
    one, infos = encode_videos(model, paths, batch=1, progress=False)
    three, _ = encode_videos(model, paths, batch=3, workers=1, progress=False)
    torch.testing.assert_close(one, three, rtol=1e-4, atol=1e-5)
    assert [i["indices"] for i in infos] == [[0, 2, 4, 6, 8, 10], [0, 8], [0, 3, 6]]


def test_eval_video_cli_errors_are_one_line(tiny_folder, clips, tmp_path, capsys):
    csv_path = tmp_path / "ann.csv"
    csv_path.write_text("video_id,sentence\nvideo0,a\nvideo70,b\nvideo80,c\n")
    base = ["eval-video", "--model", tiny_folder, "--videos", clips, "--output-dir", str(tmp_path / "o"),
            "--device", "cpu"]
    rc, _, err = _main(capsys, *base, "--annotations", str(csv_path))
    assert rc == 1 and "error: 2 of 3 videos have no file in" in err and "'video70', 'video80'" in err
    assert "Traceback" not in err
    good = tmp_path / "good.csv"
    good.write_text("video_id,sentence\nvideo0,a\n")
    rc, _, err = _main(capsys, *base, "--annotations", str(good), "--max-length", "60")
    assert rc == 1 and "tokens, more than the maximum length 60: lower --max-frames to" in err
    assert "raise --max-length" in err and "Traceback" not in err
    # the tiny model's max_position_embeddings (4096) caps the default 8192: no flag raises that
    rc, _, err = _main(capsys, *base, "--annotations", str(good), "--max-frames", "100000")
    assert rc == 1 and "maximum length 4096" in err and "no flag raises it" in err and "raise --max-length" not in err
    (a_file := tmp_path / "afile").write_text("")
    rc, _, err = _main(capsys, *base[:-4], "--output-dir", str(a_file), "--device", "cpu", "--annotations", str(good))
    assert rc == 1 and "--output-dir" in err and "a file, not a folder" in err and "Traceback" not in err, err
    rc, _, err = _main(capsys, *base, "--annotations", str(tmp_path / "none.csv"))
    assert rc == 1 and "--annotations" in err and "none.csv" in err
    rc, _, err = _main(capsys, *base, "--annotations", str(good), "--fps", "0")
    assert rc == 2 and "expected a positive number" in err


def test_embedder_encode_videos_matches_the_eval_path(tiny_folder, clips):
    from llave_fast.model import LLaVEEmbedder

    model = LLaVEEmbedder.from_pretrained(tiny_folder)
    paths = find_videos(["video0", "video3"], clips)
    frames = [decode_video(p)[0] for p in paths]
    got = model.encode_videos(frames, batch_size=1)
    want, _ = encode_videos(model, paths, batch=2, progress=False)
    assert model.training  # left as it was
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    with pytest.raises(TypeError, match="videos must be a list"):
        model.encode_videos(frames[0])
    with pytest.raises(ValueError, match=r"videos\[0\]: got a \(frames, info\) pair.*frames, info = decode_video"):
        model.encode_videos([decode_video(paths[0])])


def test_eval_video_without_pyav_says_how_to_install(tiny_folder, clips, tmp_path, capsys, monkeypatch):
    good = tmp_path / "good.csv"
    good.write_text("video_id,sentence\nvideo0,a\n")
    monkeypatch.setitem(sys.modules, "av", None)
    rc, _, err = _main(capsys, "eval-video", "--model", tiny_folder, "--videos", clips, "--annotations", str(good),
                       "--output-dir", str(tmp_path / "o"), "--device", "cpu")
    assert rc == 1 and 'pip install "llave-fast[video]"' in err and "Traceback" not in err


def test_readme_video_commands_use_real_flags():
    import re

    from llave_fast.cli import build_parser

    readme = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
    text = open(readme, encoding="utf-8").read()
    section = text[text.index("## Zero-shot text-video retrieval"):]
    section = section[: section.index("\n## ", 1)]
    sub = next(a for a in build_parser(["eval-video"])._actions if a.dest == "command").choices["eval-video"]
    known = {s for a in sub._actions for s in a.option_strings}
    used = set(re.findall(r"(?<![\w-])--[a-z][a-z_-]+", section))
    assert used and used <= known, sorted(used - known)


def test_a_bad_video_stops_the_evaluation_naming_it(tiny_folder, clips, tmp_path):
    from llave_fast.model import LLaVEEmbedder

    bad = tmp_path / "video9.mp4"
    bad.write_bytes(b"\x00" * 300)
    model = LLaVEEmbedder.from_pretrained(tiny_folder).eval()
    paths = find_videos(["video0"], clips) + [str(bad)] + find_videos(["video2", "video3"], clips)
    with pytest.raises(VideoDataError, match=r"video9.mp4: cannot be decoded as a video"):
        encode_videos(model, paths, batch=1, progress=False)


def test_the_old_module_name_is_a_deprecated_alias():
    import importlib

    import llave_fast.eval_video as new

    old = importlib.import_module("llave_fast.video")
    with pytest.warns(DeprecationWarning, match="llave_fast.video.encode_videos is deprecated: import it from "
                                                "llave_fast.eval_video"):
        assert old.encode_videos is new.encode_videos
    with pytest.warns(DeprecationWarning):
        from llave_fast.video import retrieval_metrics as old_metrics  # noqa: F401 - the import under test
    assert old_metrics is new.retrieval_metrics
    with pytest.raises(AttributeError):
        old.no_such_name  # noqa: B018


# ------------------------------------------------------------------------------------------
# DeepSpeed ZeRO-3: image_newline is partitioned; the video path must gather it as the image path does
# ------------------------------------------------------------------------------------------


def _zero3_video_rank(rank, world):
    import copy

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    deepspeed.init_distributed(dist_backend="gloo")
    ref = build_tiny_model(0).eval()
    rng = np.random.RandomState(5)
    frames = [rng.randint(0, 256, (n, 48, 80, 3), dtype=np.uint8) for n in (3, 2)]
    pixels = [mv.frames_to_pixels(ref.processor, f) for f in frames]
    batch = mv.video_batch(ref.processor, pixels)
    with torch.no_grad():
        want = ref.encode_videos(frames, batch_size=2)
        want_feats = mv.video_features(ref.model, torch.cat(pixels), [3, 2])
    weights = torch.randn(want.shape[1], generator=torch.Generator().manual_seed(1))
    (mv.embed_video_batch(ref, batch) @ weights).sum().backward()
    want_grad = ref.model.image_newline.grad.clone()

    model = copy.deepcopy(ref)
    model.zero_grad(set_to_none=True)
    config = {"train_micro_batch_size_per_gpu": 1, "zero_allow_untested_optimizer": True,
              # threshold 0: image_newline (D elements) is partitioned, as a real model's always is
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0), config=config)
    newline = engine.module.model.image_newline
    assert newline.numel() == 0 and newline.ds_numel == want_feats[0].shape[1], "image_newline not partitioned"
    # the embedder's own video entry point (eval-video's) runs inside the root module's forward
    torch.testing.assert_close(engine.module.encode_videos(frames, batch_size=2), want, rtol=1e-5, atol=1e-6)
    # the layout function called directly, outside any forward: gathered for reading, then partitioned again
    with torch.no_grad():
        got_feats = mv.video_features(engine.module.model, torch.cat(pixels), [3, 2])
    for g, w in zip(got_feats, want_feats):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    assert newline.numel() == 0
    with pytest.raises(ValueError, match="partitioned by DeepSpeed ZeRO-3"):
        mv.video_features(engine.module.model, torch.cat(pixels), [3, 2])  # gradients on: would be lost
    # with gradients: image_newline's gradient arrives whole through ZeRO-3's reduction
    engine.module.train()
    loss = (mv.embed_video_batch(engine.module, batch) @ weights).sum()
    engine.backward(loss)
    grad = safe_get_full_grad(newline)
    assert grad is not None, "image_newline got no gradient under ZeRO-3"
    torch.testing.assert_close(grad, want_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_zero3_partitioned_model_embeds_videos_like_the_whole_one():
    pytest.importorskip("deepspeed")
    from llave_fast.testing import spawn_ranks

    spawn_ranks(_zero3_video_rank, 2)


def test_bad_video_files_are_found_before_any_video_is_encoded(tiny_folder, clips, tmp_path, capsys, monkeypatch):
    """A text file, an empty file or an audio-only file among the videos stopped the run when its turn came
    (hours of encoding lost at scale): every one is found by opening the containers, before any encoding."""
    import shutil

    import llave_fast.eval_video as ev

    videos = tmp_path / "videos"
    shutil.copytree(clips, videos)
    (videos / "video90.mp4").write_text("not a video")
    (videos / "video91.mp4").write_bytes(b"")
    ann = tmp_path / "ann.csv"
    ann.write_text("video_id,sentence\nvideo0,a red square\nvideo90,b\nvideo91,c\n")

    def no_encoding(*a, **k):
        raise AssertionError("a video was encoded before the video files were checked")

    monkeypatch.setattr(ev, "encode_videos", no_encoding)
    rc, _, err = _main(capsys, "eval-video", "--model", tiny_folder, "--videos", str(videos), "--annotations", str(ann),
                       "--output-dir", str(tmp_path / "o"), "--device", "cpu")
    assert rc == 1 and "(2 of the 3 videos cannot be used; " in err and "Traceback" not in err, err
    assert "video90.mp4: cannot be opened as a video" in err and "video91.mp4: cannot be opened" in err
    assert err.count("video90.mp4") == 1, err  # each path once
    # one bad file: its own reason alone, said once
    os.remove(videos / "video91.mp4")
    ann.write_text("video_id,sentence\nvideo0,a red square\nvideo90,b\n")
    rc, _, err = _main(capsys, "eval-video", "--model", tiny_folder, "--videos", str(videos), "--annotations", str(ann),
                       "--output-dir", str(tmp_path / "o"), "--device", "cpu")
    line = [ln for ln in err.splitlines() if "video90.mp4" in ln]
    assert rc == 1 and len(line) == 1 and line[0].count("video90.mp4") == 1, err
    assert line[0].endswith(")") and "cannot be used" not in line[0], err
    # --video-list given a folder names the flag
    rc, _, err = _main(capsys, "eval-video", "--model", tiny_folder, "--videos", clips, "--annotations", str(ann),
                       "--video-list", str(tmp_path), "--output-dir", str(tmp_path / "o"))
    assert rc == 1 and f"--video-list {str(tmp_path)!r}: not a file" in err, err


def test_a_caption_repeated_for_one_video_is_said(tmp_path, caplog):
    """Each caption row is a query (CLIP4Clip counts MSVD's repeated captions): kept, but a copied row is said."""
    import logging

    ann = tmp_path / "dup.csv"
    ann.write_text("video_id,sentence\nv1,a dog\nv2,a cat\nv1,a dog\n")
    with caplog.at_level(logging.WARNING, logger="llave_fast.data.video_annotations"):
        got = read_annotations(str(ann))
    assert got.num_captions == 3 and got.num_videos == 2
    assert "1 caption row(s) repeat a caption of the same video" in caplog.text and "'v1', 'a dog'" in caplog.text
    caplog.clear()
    ann.write_text("video_id,sentence\nv1,a dog\nv2,a dog\n")  # one caption for two videos: no repeat
    with caplog.at_level(logging.WARNING, logger="llave_fast.data.video_annotations"):
        read_annotations(str(ann))
    assert "repeat" not in caplog.text


def test_a_cut_mkv_that_decodes_short_is_said_and_listed(tiny_folder, clips, tmp_path, capsys, caplog):
    """A damaged or cut mkv/webm decodes up to the damage without an error (18 of 60 frames here): the
    run says so and video_eval.json lists it, with every video's decoded and stated frame counts."""
    import logging
    import shutil

    from llave_fast.testing import write_clip

    videos = tmp_path / "videos"
    shutil.copytree(clips, videos)
    whole = write_clip(tmp_path / "whole.mkv", 60, 10)
    data = open(whole, "rb").read()
    (videos / "video95.mkv").write_bytes(data[: len(data) // 2])
    assert decode_video(str(videos / "video95.mkv"))[1]["stated_frames"] == 60
    ann = tmp_path / "ann.csv"
    ann.write_text("video_id,sentence\nvideo0,a red square\nvideo95,a red square moving\n")
    out = tmp_path / "o"
    with caplog.at_level(logging.WARNING, logger="llave_fast.eval_video"):
        rc, _, err = _main(capsys, "eval-video", "--model", tiny_folder, "--videos", str(videos), "--annotations",
                           str(ann), "--output-dir", str(out), "--device", "cpu")
    assert rc == 0, err
    assert "1 of 2 videos decoded to far fewer frames than their containers' duration states" in caplog.text
    res = json.loads((out / "video_eval.json").read_text())
    assert res["short_videos"] == ["video95"]
    rows = {r["id"]: r for r in res["per_video"]}
    assert rows["video95"]["stated_frames"] == 60 and rows["video95"]["num_frames"] < 30
    assert rows["video0"]["num_frames"] == rows["video0"]["stated_frames"] == 12
    assert rows["video0"]["rotation"] == 0  # no display matrix: shown as stored


def test_an_msrvtt_file_of_several_splits_is_refused_naming_them(tmp_path):
    """CLIP4Clip's MSRVTT_data.json holds train, validate and test: all 10k videos would have been scored."""
    f = tmp_path / "MSRVTT_data.json"
    f.write_text(json.dumps({"videos": [{"video_id": "video0", "split": "train"}, {"video_id": "video1", "split": "test"},
                                        {"video_id": "video2", "split": "test"}],
                             "sentences": [{"video_id": "video0", "caption": "a"}, {"video_id": "video1", "caption": "b"},
                                           {"video_id": "video2", "caption": "c"}]}))
    with pytest.raises(ValueError, match=r"several splits \(test 2, train 1\).*--video-list"):
        read_annotations(str(f))
    (tmp_path / "test_list.txt").write_text("video1\nvideo2\n")  # the remedy the message gives
    assert read_annotations(str(f), str(tmp_path / "test_list.txt")).video_ids == ["video1", "video2"]
    one = tmp_path / "test_videodatainfo.json"
    one.write_text(json.dumps({"videos": [{"video_id": "video1", "split": "test"}],
                               "sentences": [{"video_id": "video1", "caption": "b"}]}))
    assert read_annotations(str(one)).num_captions == 1


def test_the_extension_written_on_an_id_picks_the_file_and_two_extensions_are_refused(tmp_path):
    """Ids are matched without their extension: 'a.mp4' resolved to a.avi when both existed (the first in
    sort order), and ids 'a.mp4' and 'a.avi' were merged into one video holding both captions."""
    videos = tmp_path / "v"
    videos.mkdir()
    for name in ("a.avi", "a.mp4", "b.mkv"):
        (videos / name).write_bytes(b"")
    ann = tmp_path / "ann.csv"
    ann.write_text("video_id,sentence\na.mp4,x\nb,y\n")
    got = read_annotations(str(ann))
    assert got.video_ids == ["a", "b"] and got.extensions == {"a": ".mp4"}
    assert find_videos(got.video_ids, str(videos), got.extensions) == [str(videos / "a.mp4"), str(videos / "b.mkv")]
    assert find_videos(got.video_ids, str(videos)) == [str(videos / "a.avi"), str(videos / "b.mkv")]  # no extension
    ann.write_text("video_id,sentence\na.mp4,x\na.avi,y\n")
    with pytest.raises(ValueError, match=r"video ids 'a\.mp4' and 'a\.avi' name two files but one video 'a'"):
        read_annotations(str(ann))
    (tmp_path / "list.txt").write_text("a\n")  # a --video-list keeps the extension of the ids it keeps
    ann.write_text("video_id,sentence\na.mp4,x\nb,y\n")
    assert read_annotations(str(ann), str(tmp_path / "list.txt")).extensions == {"a": ".mp4"}


def test_a_json_video_id_written_twice_is_refused_and_linked_folders_are_searched(tmp_path):
    """json kept the last of two equal keys ({"v1": [...], "v1": [...]} lost the first captions), and a
    symbolic-link sub-folder of --videos (dataset parts linked in) was not searched."""
    f = tmp_path / "ann.json"
    f.write_text('{"v1": ["a dog"], "v2": ["a cat"], "v1": ["a puppy"]}')
    with pytest.raises(ValueError, match=r"ann\.json: the key 'v1' is written twice in one object"):
        read_annotations(str(f))
    part = tmp_path / "part2"
    part.mkdir()
    (part / "c.mp4").write_bytes(b"")
    videos = tmp_path / "videos"
    videos.mkdir()
    (videos / "a.mp4").write_bytes(b"")
    os.symlink(part, videos / "linked")
    os.symlink(videos, part / "loop")  # a cycle (part2/loop -> videos -> linked -> part2): each folder searched once
    assert find_videos(["a", "c"], str(videos)) == [str(videos / "a.mp4"), str(videos / "linked" / "c.mp4")]


# ------------------------------------------------------------------------------------------
# decoding: memory held, stopping, display rotation
# ------------------------------------------------------------------------------------------


def _stub_processor(size=32):
    """What frames_to_pixels reads of a processor (the tile size, LLaVEProcessor's normalisation)."""
    import types

    from llave_fast.model.processor import LLaVEProcessor

    proc = types.SimpleNamespace(image_size=size, rescale_factor=1 / 255, image_mean=(0.5, 0.4, 0.3),
                                 image_std=(0.2, 0.3, 0.4))
    proc._normalise = lambda img: LLaVEProcessor._normalise(proc, img)
    return proc


def _traced_peak(fn):
    """(fn(), the peak bytes numpy and Python allocated during the call; PyAV's frame buffers are not counted:
    :class:`_WatchedAV` counts those)."""
    import tracemalloc

    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        out = fn()
        return out, tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


class _WatchedAV:
    """PyAV as eval_video uses it (``_require_av``), watched: every decoded frame is counted (``frames``) and
    slowed by ``delay`` seconds, and the RGB arrays ``to_ndarray`` made that are still alive are counted (a
    full-size frame each: PyAV's buffer, which tracemalloc does not see), their most at once in ``most_alive``.
    Files named ``fail*`` open only once a decode is under way, then fail (``failbad.mp4``: not a video;
    ``failint.mp4``: Ctrl-C)."""

    def __init__(self, delay=0.0):
        import threading

        self.error, self.delay = av.error, delay
        self.started = threading.Event()
        self.frames = self.alive = self.most_alive = 0

    def open(self, path, *args, **kwargs):
        name = os.path.basename(path)
        if name.startswith("fail"):
            assert self.started.wait(5), "no decode started"
            if name == "failint.mp4":
                raise KeyboardInterrupt
        return _WatchedContainer(av.open(path, *args, **kwargs), self)

    def made(self, array):
        import weakref

        self.alive += 1
        self.most_alive = max(self.most_alive, self.alive)
        weakref.finalize(array, self._freed)
        return array

    def _freed(self):
        self.alive -= 1


class _WatchedContainer:
    def __init__(self, container, owner):
        self.container, self.owner = container, owner

    def __getattr__(self, name):
        return getattr(self.container, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.container.close()

    def decode(self, stream):
        import time

        for frame in self.container.decode(stream):
            self.owner.frames += 1
            self.owner.started.set()
            if self.owner.delay:
                time.sleep(self.owner.delay)
            yield _WatchedFrame(frame, self.owner)


class _WatchedFrame:
    def __init__(self, frame, owner):
        self.frame, self.owner = frame, owner

    def __getattr__(self, name):
        return getattr(self.frame, name)

    def to_ndarray(self, *args, **kwargs):
        return self.owner.made(self.frame.to_ndarray(*args, **kwargs))


@pytest.mark.parametrize("count_off", [False, True], ids=["count-right", "container-count-off"])
def test_decoding_holds_one_full_size_frame_not_all_of_them(tmp_path, monkeypatch, count_off):
    """eval-video's worker held every kept full-resolution frame of a video (32 x 3840 x 2160 x 3 = 0.8 GB for
    4K) and a stacked copy of them before making the model's 384-px pixels: now each kept frame becomes its
    pixels as soon as it is decoded (one full-size frame held at a time), bit for bit the same pixels. When the
    container's frame count is off (the clip is decoded twice), the first pass's frames are no longer held
    through the second."""
    import llave_fast.eval_video as ev

    path = write_clip(tmp_path / "clip.mp4", 40, 30, size=384)  # at --fps 30: 32 of the 40 frames
    frame_bytes = 384 * 384 * 3
    if count_off:
        real = ev._frame_count
        monkeypatch.setattr(ev, "_frame_count", lambda *a, **k: (real(*a, **k)[0] + 3,) + real(*a, **k)[1:])
    watched = _WatchedAV()
    monkeypatch.setattr(ev, "_require_av", lambda: watched)
    proc = _stub_processor()
    (pixels, info), traced = _traced_peak(lambda: ev._prepare(proc, path, 30, 32))
    assert len(info["indices"]) == 32 and info["num_frames"] == 40
    assert watched.most_alive <= 2, f"{watched.most_alive} decoded full-size frames alive at once"
    assert traced < pixels.nbytes + 2 * frame_bytes, f"{traced / frame_bytes:.1f} frames' bytes allocated at once"
    # the pixels the model receives are those of the whole-clip path, bit for bit
    watched.most_alive = 0
    frames, info2 = decode_video(path, fps=30, max_frames=32)
    assert info2 == info and frames.shape == (32, 384, 384, 3)
    assert watched.most_alive <= 33, f"{watched.most_alive} frames alive at once (the first pass's kept?)"
    want = mv.frames_to_pixels(proc, frames)
    assert pixels.dtype == want.dtype == torch.float32 and torch.equal(pixels, want)


@pytest.mark.parametrize("stopper, error", [("failbad.mp4", VideoDataError), ("failint.mp4", KeyboardInterrupt)],
                         ids=["bad-video", "ctrl-c"])
def test_a_stopped_run_stops_the_decode_running_beside_it(tmp_path, monkeypatch, stopper, error):
    """A bad video or Ctrl-C stopped encode_videos, which then waited for the decode running in the other worker
    thread to reach the end of its clip (every frame is decoded, to count them: minutes for an hour-long
    video): now that decode gives up within a frame."""
    import time
    import types

    import llave_fast.eval_video as ev

    long_clip = write_clip(tmp_path / "long.mp4", 400, 30)  # 400 frames x 5 ms: 2 s to decode to the end
    (tmp_path / stopper).write_bytes(b"\x00" * 300)
    watched = _WatchedAV(delay=0.005)
    monkeypatch.setattr(ev, "_require_av", lambda: watched)
    model = types.SimpleNamespace(processor=_stub_processor())
    t0 = time.perf_counter()
    with pytest.raises(error):
        encode_videos(model, [str(tmp_path / stopper), long_clip], batch=1, workers=2, progress=False)
    seconds = time.perf_counter() - t0
    assert watched.started.is_set()  # the long clip was being decoded when the run stopped
    assert watched.frames < 40, f"the running decode went on for {watched.frames} of 400 frames after the stop"
    assert seconds < 1.5  # to the end: 400 x 5 ms = 2 s at least


@pytest.mark.skipif(not hasattr(av.video.stream.VideoStream, "set_display_rotation"),
                    reason="this PyAV cannot write a display rotation")
@pytest.mark.parametrize("ccw, turned", [(-90, 90), (180, 180), (90, 270), (45, 315)])
def test_a_display_rotation_is_applied_as_decord_applies_it(tmp_path, ccw, turned):
    """Phone videos are stored sideways with a display matrix saying how to show them. LLaVE decodes with
    decord, which turns the frames by the matrix's rotation (-av_display_rotation_get, when it is 90, 180 or
    270 degrees clockwise; transpose filters, flips ignored): so does decode_video. Any other angle is left
    as stored (decord's filter does the same) and recorded."""
    from fractions import Fraction

    def write(path, rotation):
        with av.open(str(path), "w") as c:
            s = c.add_stream("mpeg4", rate=Fraction(6))
            s.width, s.height, s.pix_fmt = 48, 32, "yuv420p"
            if rotation is not None:
                s.set_display_rotation(rotation)
            for _ in range(4):
                img = np.zeros((32, 48, 3), np.uint8)
                img[:12, :12] = 255  # a white block in the stored frame's top-left corner
                for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                    c.mux(p)
            for p in s.encode():
                c.mux(p)
        return str(path)

    plain, plain_info = decode_video(write(tmp_path / "plain.mp4", None))
    got, info = decode_video(write(tmp_path / "turned.mp4", ccw))
    assert plain_info["rotation"] == 0 and info["rotation"] == turned
    k = {90: -1, 180: 2, 270: 1}.get(turned, 0)  # np.rot90 turns counter-clockwise
    assert np.array_equal(got, np.rot90(plain, k, axes=(1, 2)))
    # where the stored top-left corner is shown: turned 90 degrees clockwise, at the top right
    corner = {90: (0, -1), 180: (-1, -1), 270: (-1, 0), 315: (0, 0)}[turned]
    rows, cols = got.shape[1:3]
    y, x = (0 if corner[0] == 0 else rows - 6), (0 if corner[1] == 0 else cols - 6)
    assert got[0, y: y + 6, x: x + 6].min() > 200, (turned, got.shape)


def test_rotations_are_said_and_those_left_as_stored_warned(caplog):
    """eval-video says how many videos it turned upright, and warns about those scored as stored: an angle
    decord does not turn either, or a PyAV that cannot read the rotation."""
    import logging

    from llave_fast.eval_video import _say_rotations

    rows = [{"file": f"v{i}.mp4", "rotation": r} for i, r in enumerate([0, 90, 270, 315, None, 0])]
    with caplog.at_level(logging.INFO, logger="llave_fast.eval_video"):
        _say_rotations(rows)
    text = caplog.text
    assert "2 of 6 videos carry a display rotation (phone videos) and were turned upright" in text
    assert "v1.mp4 (90 degrees), v2.mp4 (270 degrees)" in text
    assert "1 of 6 videos carry a display rotation that is no multiple of 90 degrees" in text and "v3.mp4" in text
    assert "cannot read a video's display rotation (no VideoFrame.rotation): 1 videos" in text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="llave_fast.eval_video"):
        _say_rotations(rows[:1])
    assert caplog.text == ""
