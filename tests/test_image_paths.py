"""Image paths of data rows stay inside the image folder (issue 23, item 7).

An absolute path elsewhere, a ``..`` that climbs out, or a symbolic link inside the folder
that leads out of it is a bad row at FILE:LINE, refused before the target is looked at (so the
message is the same whether such a file exists), unless ``allow_outside_image_dir`` /
``--allow-outside-image-dir`` allows it; paths inside the folder (nested, absolute, through a
link that stays inside) read as before. MMEB-train (``MMEBDataset``, ``train``) and MMEB-eval
(``read_eval_file``/``read_eval_set``, ``eval``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from llave_fast.data import BadDataError, MMEBDataset
from llave_fast.data import mmeb as M

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAG = "--allow-outside-image-dir"


def _png(path, size=(8, 6)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, (200, 30, 30)).save(path)


@pytest.fixture
def tree(tmp_path):
    """img/ (the image folder: sub/ok.png, a link to a folder outside, a link to a file outside,
    a link that stays inside) and out/ (outside: secret.png; no missing.png)."""
    img, out = tmp_path / "img", tmp_path / "out"
    _png(str(img / "sub" / "ok.png"))
    _png(str(out / "secret.png"), (5, 4))
    os.symlink(out, img / "outdir")
    os.symlink(out / "secret.png", img / "secret_link.png")
    os.symlink(img / "sub", img / "inner")  # a link that stays inside
    return tmp_path, img, out


def _train_file(path, image_paths, column="qry_image_path"):
    rows = []
    for p in image_paths:
        row = {"qry": "q", "qry_image_path": "", "pos_text": "t", "pos_image_path": ""}
        row[column] = p
        rows.append(row)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _outside_paths(img, out):
    """Every way out, each as a row would write it."""
    return {
        "absolute": str(out / "secret.png"),
        "dotdot": "../out/secret.png",
        "nested dotdot": "sub/../../out/secret.png",
        "link to a folder outside": "outdir/secret.png",
        "link to a file outside": "secret_link.png",
        "link then dotdot": "outdir/../out/secret.png",
    }


# ------------------------------------------------------------------------------ MMEB-train
@pytest.mark.parametrize("kind", ["absolute", "dotdot", "nested dotdot", "link to a folder outside",
                                  "link to a file outside", "link then dotdot"])
def test_train_row_leading_outside_is_a_bad_row_at_file_line(tree, kind):
    tmp, img, out = tree
    rel = _outside_paths(img, out)[kind]
    f = _train_file(tmp / "d.jsonl", ["sub/ok.png", rel])
    with pytest.raises(BadDataError) as info:
        MMEBDataset(f, str(img))
    msg = str(info.value)
    assert msg.startswith(f"{f}:2: image path outside the image folder: {rel!r} (qry_image_path)"), msg
    assert str(img) in msg and FLAG in msg and "allow_outside_image_dir=True" in msg
    assert "--skip-bad-rows" in msg  # a bad row like any other
    assert ("symbolic link" in msg) == kind.startswith("link"), msg
    assert "secret.png'" not in msg.replace(repr(rel), "")  # names the row's path only, not where it leads


def test_train_rows_inside_read_and_rows_outside_are_skipped_with_skip_bad_rows(tree):
    tmp, img, out = tree
    inside = ["sub/ok.png", str(img / "sub" / "ok.png"), "sub/../sub/ok.png", "inner/ok.png",
              "outdir/../img/sub/ok.png"]  # the last: out of the folder through a link and back, as the kernel reads it
    outside = list(_outside_paths(img, out).values())
    f = _train_file(tmp / "d.jsonl", inside + outside)
    ds = MMEBDataset(f, str(img), skip_bad_rows=True, check_images="decode")
    assert len(ds) == len(inside)
    assert [ds[i]["qry_image"].size for i in range(len(ds))] == [(8, 6)] * len(inside)
    assert [r for _, r, _ in ds.skipped] == list(range(len(inside), len(inside) + len(outside)))
    assert all(why.startswith("image path outside the image folder: ") for _, _, why in ds.skipped)
    # the same in a target column, a negative column, and a parquet file (FILE: row N)
    g = _train_file(tmp / "p.jsonl", ["sub/ok.png", "../out/secret.png"], column="pos_image_path")
    with pytest.raises(BadDataError, match=r"p\.jsonl:2: image path outside the image folder: .*pos_image_path"):
        MMEBDataset(g, str(img))
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    rows = [json.loads(line) for line in open(f)]
    for r in rows:
        r.update(neg_text="n", neg_image_path=r["qry_image_path"], qry_image_path="sub/ok.png")
    pq.write_table(pa.Table.from_pylist(rows), str(tmp / "n.parquet"))
    with pytest.raises(BadDataError, match=rf"n\.parquet: row {len(inside) + 1}: image path outside .*neg_image_path"):
        MMEBDataset(str(tmp / "n.parquet"), str(img), use_negatives=True)
    assert len(MMEBDataset(str(tmp / "n.parquet"), str(img))) == len(rows)  # negatives not used: never opened


def test_train_message_is_the_same_whether_the_file_outside_exists(tree):
    tmp, img, out = tree
    os.symlink(out / "missing.png", img / "missing_link.png")  # a dangling link
    pairs = [(str(out / "secret.png"), str(out / "missing.png")), ("../out/secret.png", "../out/missing.png"),
             ("outdir/secret.png", "outdir/missing.png"), ("secret_link.png", "missing_link.png")]
    for check in ("exists", "decode", "none"):
        for there, absent in pairs:
            msgs = []
            for rel in (there, absent):
                with pytest.raises(BadDataError) as info:
                    MMEBDataset(_train_file(tmp / "d.jsonl", [rel]), str(img), check_images=check)
                msgs.append(str(info.value).replace(rel, "<PATH>"))
            assert msgs[0] == msgs[1], (check, msgs)
            assert "not found" not in msgs[0] and "unreadable" not in msgs[0]


def test_train_never_looks_at_a_path_outside(tree, monkeypatch):
    """A path that climbs out is refused from its text: nothing outside is stat-ed or opened; through
    a link, nothing outside is opened or checked for existence (the link itself is read, inside)."""
    tmp, img, out = tree
    touched = []
    real_stat, real_lstat, real_open = os.stat, os.lstat, Image.open

    def spy(fn):
        def wrapped(p, *a, **k):
            touched.append(os.fspath(p) if isinstance(p, (str, os.PathLike)) else p)
            return fn(p, *a, **k)
        return wrapped

    lexical = [str(out / "secret.png"), "../out/secret.png", "sub/../../out/secret.png"]
    f = _train_file(tmp / "d.jsonl", ["sub/ok.png"] + lexical)
    monkeypatch.setattr(os, "stat", spy(real_stat))
    monkeypatch.setattr(os, "lstat", spy(real_lstat))
    monkeypatch.setattr(Image, "open", spy(real_open))  # PIL.Image: what data.images opens with
    for check in ("exists", "decode"):
        ds = MMEBDataset(f, str(img), skip_bad_rows=True, check_images=check)
        assert len(ds) == 1 and len(ds.skipped) == 3
    assert touched and not [p for p in touched if isinstance(p, str) and os.path.abspath(p).startswith(str(out))], \
        touched
    touched.clear()
    monkeypatch.setattr(os, "lstat", real_lstat)  # realpath reads the links (inside) and may lstat where they lead
    linked = _train_file(tmp / "l.jsonl", ["sub/ok.png", "outdir/secret.png", "secret_link.png"])
    ds = MMEBDataset(linked, str(img), skip_bad_rows=True, check_images="decode")
    assert len(ds) == 1 and len(ds.skipped) == 2
    assert not [p for p in touched if isinstance(p, str) and "secret" in p], touched  # never stat-ed nor opened


def test_allow_outside_image_dir_reads_them(tree):
    tmp, img, out = tree
    outside = list(_outside_paths(img, out).values())
    f = _train_file(tmp / "d.jsonl", ["sub/ok.png"] + outside)
    ds = MMEBDataset(f, str(img), allow_outside_image_dir=True, check_images="decode")
    assert len(ds) == 1 + len(outside) and ds.skipped == []
    assert [ds[i]["qry_image"].size for i in range(len(ds))] == [(8, 6)] + [(5, 4)] * len(outside)
    with M.outside_image_dir_allowed():  # the readers' default inside the block (what `eval --allow-...` uses)
        assert len(MMEBDataset(f, str(img))) == 1 + len(outside)
        with pytest.raises(BadDataError, match="outside the image folder"):
            MMEBDataset(f, str(img), allow_outside_image_dir=False)  # an explicit value wins
    with pytest.raises(BadDataError, match="outside the image folder"):
        MMEBDataset(f, str(img))  # the block is over
    with pytest.raises(ValueError, match=r"allow_outside_image_dir must be True, False or None, got 'yes'"):
        MMEBDataset(f, str(img), allow_outside_image_dir="yes")


def test_default_image_folder_is_the_data_files_folder(tree):
    """Without image_dir the paths are relative to the data file's folder, and must stay in it."""
    tmp, img, out = tree
    f = _train_file(img / "d.jsonl", ["sub/ok.png", "../out/secret.png"])
    with pytest.raises(BadDataError, match=rf"d\.jsonl:2: .*is not under {str(img)!r}"):
        MMEBDataset(f)
    assert len(MMEBDataset(f, skip_bad_rows=True)) == 1


def test_train_config_option_and_flag(tree):
    from llave_fast.cli import build_parser, train_config_from_args
    from llave_fast.train import TrainConfig, _datasets

    tmp, img, out = tree
    f = _train_file(tmp / "d.jsonl", ["sub/ok.png", "../out/secret.png"])
    with pytest.raises(BadDataError, match=r"d\.jsonl:2: image path outside the image folder"):
        _datasets(TrainConfig(data=f, image_dir=str(img)))
    assert len(_datasets(TrainConfig(data=f, image_dir=str(img), allow_outside_image_dir=True))[0]) == 2
    assert len(_datasets(TrainConfig(data=f, image_dir=str(img), skip_bad_rows=True))[0]) == 1
    argv = ["train", "--data", f, "--image-dir", str(img)]
    assert train_config_from_args(build_parser(argv).parse_args(argv)).allow_outside_image_dir is False
    argv.append(FLAG)
    assert train_config_from_args(build_parser(argv).parse_args(argv)).allow_outside_image_dir is True


@pytest.mark.slow
def test_train_command_stops_on_a_row_outside_naming_file_line_and_the_flag(tree):
    """The whole command, in a subprocess: one error line before the model is built."""
    tmp, img, out = tree
    f = _train_file(tmp / "d.jsonl", ["sub/ok.png"] * 3 + ["../out/secret.png"])
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-m", "llave_fast", "train", "--data", f, "--image-dir", str(img),
                        "--output-dir", str(tmp / "run"), "--steps", "1", "--global-batch", "2"],
                       capture_output=True, text=True, timeout=300, cwd=str(tmp), env=env)
    assert r.returncode == 1, r.stderr[-3000:]
    line = next(x for x in r.stderr.splitlines() if "error:" in x)
    assert f"{f}:4: image path outside the image folder: '../out/secret.png'" in line and FLAG in line, r.stderr
    assert "Traceback" not in r.stderr and not (tmp / "run").exists()


# ------------------------------------------------------------------------------ MMEB-eval
def _eval_file(path, qry_img="", cand_imgs=("", "")):
    row = {"qry_text": "q", "qry_img_path": qry_img, "tgt_text": ["a", "b"],
           "tgt_img_path": list(cand_imgs)}
    good = {"qry_text": "q", "qry_img_path": "sub/ok.png", "tgt_text": ["a", "b"], "tgt_img_path": ["", ""]}
    path.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    return str(path)


@pytest.mark.parametrize("kind", ["absolute", "dotdot", "link to a folder outside", "link to a file outside"])
def test_eval_row_leading_outside_is_refused_at_file_line(tree, kind):
    from llave_fast.data.mmeb_eval import find_eval_datasets, read_eval_file, read_eval_set

    tmp, img, out = tree
    rel = _outside_paths(img, out)[kind]
    for f, what in ((_eval_file(tmp / "q.jsonl", qry_img=rel), "query image"),
                    (_eval_file(tmp / "c.jsonl", cand_imgs=("sub/ok.png", rel)), "candidate 1 image")):
        with pytest.raises(BadDataError) as info:
            read_eval_file(f, str(img))
        msg = str(info.value)
        assert msg.startswith(f"{f}:2: image path outside the image folder: {rel!r} ({what})"), msg
        assert FLAG in msg and ("symbolic link" in msg) == kind.startswith("link")
        with pytest.raises(BadDataError, match="outside the image folder"):
            read_eval_set(find_eval_datasets([f])[0], str(img))
        rows = read_eval_file(f, str(img), allow_outside_image_dir=True)
        assert len(rows) == 2 and os.path.samefile(rows[1].qry_image or rows[1].cand_images[1], out / "secret.png")
        es = read_eval_set(find_eval_datasets([f])[0], str(img), allow_outside_image_dir=True)
        assert es.num_queries == 2


def test_eval_message_is_the_same_whether_the_file_outside_exists(tree):
    from llave_fast.data.mmeb_eval import read_eval_file

    tmp, img, out = tree
    for there, absent in ((str(out / "secret.png"), str(out / "missing.png")), ("../out/secret.png", "../out/x.png"),
                          ("outdir/secret.png", "outdir/missing.png")):
        msgs = []
        for rel in (there, absent):
            with pytest.raises(BadDataError) as info:
                read_eval_file(_eval_file(tmp / "e.jsonl", qry_img=rel), str(img))
            msgs.append(str(info.value).replace(rel, "<PATH>"))
        assert msgs[0] == msgs[1] and "not found" not in msgs[0], msgs


def test_eval_command_refuses_then_allows_with_the_flag(tree, capsys):
    from llave_fast.cli import main
    from llave_fast.model import build_tiny_model

    tmp, img, out = tree
    model = tmp / "tiny"
    build_tiny_model().save_pretrained(str(model))
    f = _eval_file(tmp / "e.jsonl", cand_imgs=("sub/ok.png", "../out/secret.png"))
    args = ["eval", "--model", str(model), "--data", f, "--image-dir", str(img), "--device", "cpu"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert f"{f}:2: image path outside the image folder: '../out/secret.png' (candidate 1 image)" in err
    assert FLAG in err and "Traceback" not in err
    assert main(args + [FLAG]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["datasets"]["e"]["num_queries"] == 2
    assert not M._ALLOW_OUTSIDE.get()  # the command's allowance ends with it
    # MMEB-train files under eval go through MMEBDataset: the same rule and flag
    t = _train_file(tmp / "t.jsonl", ["sub/ok.png", "../out/secret.png"])
    args = ["eval", "--model", str(model), "--data", t, "--image-dir", str(img), "--device", "cpu"]
    assert main(args) == 1 and "t.jsonl:2: image path outside the image folder" in capsys.readouterr().err
    assert main(args + [FLAG]) == 0
