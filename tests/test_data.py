"""pyoptim.data: IDX / CIFAR readers (on tiny fake files), the synthetic set, and DeviceLoader
(exactly-once epochs with a changing batch size, sharding, on-device augmentation, resume)."""
import dataclasses
import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

import pyoptim.data as D

HAS_CUDA = torch.cuda.is_available()


@pytest.fixture
def no_system_data(monkeypatch, tmp_path):
    """No $PYOPTIM_DATA and no system folders: only what a test passes explicitly is found."""
    monkeypatch.delenv("PYOPTIM_DATA", raising=False)
    monkeypatch.setattr(D.sources, "SYSTEM_ROOTS", (str(tmp_path / "sysroot"),))
    for name in ("fashion-mnist", "cifar10", "cifar100"):
        spec = D.DATASETS[name]
        monkeypatch.setitem(D.DATASETS, name, dataclasses.replace(
            spec, system_dirs=(str(tmp_path / "sys" / name),)))
    return tmp_path


# ----------------------------------------------------------------------------- fake files

def write_idx(path: Path, arr: np.ndarray, gz: bool = False) -> Path:
    codes = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C}
    dt = np.dtype(arr.dtype).newbyteorder(">") if arr.dtype.itemsize > 1 else arr.dtype
    raw = bytes([0, 0, codes[dt], arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    raw += arr.astype(dt).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(raw))
    else:
        path.write_bytes(raw)
    return path


def fake_fashion(folder: Path, n_train=7, n_test=3, gz=True, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        y = (np.arange(n) % 10).astype(np.uint8)
        write_idx(folder / f"{prefix}-images-idx3-ubyte", x, gz)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", y, gz)
        out[prefix] = (x, y)
    return out


def fake_cifar(parent: Path, name="cifar10", sizes=None, protocol=2, seed=0):
    rng = np.random.default_rng(seed)
    if name == "cifar10":
        folder, key, k = parent / "cifar-10-batches-py", b"labels", 10
        sizes = sizes or {**{f"data_batch_{i}": 2 for i in range(1, 6)}, "test_batch": 3}
    else:
        folder, key, k = parent / "cifar-100-python", b"fine_labels", 100
        sizes = sizes or {"train": 4, "test": 3}
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for fname, n in sizes.items():
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, k, n)]
        d = {b"data": data, key: labels, b"batch_label": b"fake"}
        if name == "cifar100":
            d[b"coarse_labels"] = [v // 5 for v in labels]
        (folder / fname).write_bytes(pickle.dumps(d, protocol=protocol))
        out[fname] = (data, labels)
    return folder, out


# ---------------------------------------------------------------------------------- IDX

@pytest.mark.parametrize("gz", [False, True])
def test_read_idx(tmp_path, gz):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    t = D.read_idx(write_idx(tmp_path / "a-idx3-ubyte", a, gz))
    assert t.dtype == torch.uint8 and t.shape == (2, 3, 4)
    assert torch.equal(t, torch.from_numpy(a))
    b = np.array([1, -2, 70000], dtype=np.int32)            # big-endian int32 -> native
    t = D.read_idx(write_idx(tmp_path / "b-idx1-ubyte", b, gz))
    assert t.dtype == torch.int32 and t.tolist() == [1, -2, 70000]


@pytest.mark.parametrize("gz", [False, True])
def test_fashion_mnist_fake(no_system_data, gz):
    tmp = no_system_data
    ref = fake_fashion(tmp / "fm", gz=gz)
    x, y = D.load_dataset("fashion-mnist", "train", data_dir=tmp / "fm")
    assert x.dtype == torch.uint8 and x.shape == (7, 1, 28, 28) and x.is_contiguous()
    assert y.dtype == torch.int64 and y.tolist() == ref["train"][1].tolist()
    assert torch.equal(x[:, 0], torch.from_numpy(ref["train"][0]))
    x, y = D.load_dataset("fashion_mnist", "test", data_dir=tmp / "fm")   # alias
    assert x.shape == (3, 1, 28, 28) and y.shape == (3,)


def test_lookup_order(no_system_data, monkeypatch):
    tmp = no_system_data
    fake_fashion(tmp / "explicit", n_train=5)
    fake_fashion(tmp / "envroot" / "fashion-mnist", n_train=6)     # sub-folder named after the set
    fake_fashion(tmp / "sys" / "fashion-mnist", n_train=4)          # the "system" folder
    assert D.load_dataset("fashion-mnist")[0].shape[0] == 4
    monkeypatch.setenv("PYOPTIM_DATA", str(tmp / "envroot"))
    assert D.load_dataset("fashion-mnist")[0].shape[0] == 6
    assert D.load_dataset("fashion-mnist", data_dir=tmp / "explicit")[0].shape[0] == 5
    folder, files = D.find_dataset("fashion-mnist", "test", data_dir=tmp / "explicit")
    assert folder == tmp / "explicit" and set(files) == {"images", "labels"}
    # an explicit folder without the set falls through to the next place
    assert D.load_dataset("fashion-mnist", data_dir=tmp / "nothing")[0].shape[0] == 6


def test_missing_dataset_message(no_system_data, monkeypatch):
    tmp = no_system_data
    monkeypatch.setenv("PYOPTIM_DATA", str(tmp / "envdir"))
    partial = tmp / "partial"
    partial.mkdir()
    write_idx(partial / "train-images-idx3-ubyte", np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(D.DatasetNotFoundError) as exc:
        D.load_dataset("fashion-mnist", "train", data_dir=partial)
    msg = str(exc.value)
    assert isinstance(exc.value, FileNotFoundError)
    for where in (partial, tmp / "envdir", tmp / "envdir" / "fashion-mnist",
                  tmp / "sys" / "fashion-mnist", tmp / "sysroot" / "fashion-mnist"):
        assert str(where) in msg
    assert "lacks train-labels-idx1-ubyte" in msg
    assert "sudo apt-get install dataset-fashion-mnist" in msg
    assert "--data-dir" in msg and "PYOPTIM_DATA" in msg
    with pytest.raises(D.DatasetNotFoundError, match="cifar-10-python.tar.gz"):
        D.load_dataset("cifar10", "test")


def test_corrupt_idx_names_the_file(no_system_data):
    tmp = no_system_data
    fake_fashion(tmp / "fm", gz=False)
    bad = tmp / "fm" / "train-images-idx3-ubyte"
    raw = bad.read_bytes()
    bad.write_bytes(raw[:-100])                                           # truncated
    with pytest.raises(D.DatasetCorruptError, match="truncated") as exc:
        D.load_dataset("fashion-mnist", data_dir=tmp / "fm")
    assert str(bad) in str(exc.value)
    bad.write_bytes(b"\x12\x34" + raw[2:])                               # bad magic
    with pytest.raises(D.DatasetCorruptError, match="magic") as exc:
        D.load_dataset("fashion-mnist", data_dir=tmp / "fm")
    assert str(bad) in str(exc.value)
    bad.write_bytes(raw)
    lab = tmp / "fm" / "train-labels-idx1-ubyte"
    write_idx(lab, np.full(7, 10, np.uint8))                              # label out of range
    with pytest.raises(D.DatasetCorruptError, match=r"\[0, 10\)") as exc:
        D.load_dataset("fashion-mnist", data_dir=tmp / "fm")
    assert str(lab) in str(exc.value)
    write_idx(lab, np.zeros(6, np.uint8))                                 # count mismatch
    with pytest.raises(D.DatasetCorruptError, match="7 images"):
        D.load_dataset("fashion-mnist", data_dir=tmp / "fm")
    # a damaged gzip stream
    fake_fashion(tmp / "fz", gz=True)
    gzf = tmp / "fz" / "t10k-images-idx3-ubyte.gz"
    gzf.write_bytes(gzf.read_bytes()[:40])
    with pytest.raises(D.DatasetCorruptError, match="gzip") as exc:
        D.load_dataset("fashion-mnist", "test", data_dir=tmp / "fz")
    assert str(gzf) in str(exc.value)


# ---------------------------------------------------------------------------------- CIFAR

@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar10_fake(no_system_data, protocol):
    tmp = no_system_data
    folder, ref = fake_cifar(tmp / "root", "cifar10", protocol=protocol)
    x, y = D.load_dataset("cifar10", "train", data_dir=tmp / "root")     # parent folder
    assert x.dtype == torch.uint8 and x.shape == (10, 3, 32, 32)
    assert y.dtype == torch.int64
    assert y.tolist() == sum((ref[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    d0 = ref["data_batch_1"][0][0]                       # row layout: 1024 R, 1024 G, 1024 B
    assert torch.equal(x[0, 1], torch.from_numpy(d0[1024:2048].reshape(32, 32)))
    x, y = D.load_dataset("cifar-10", "test", data_dir=folder)            # the folder itself
    assert x.shape == (3, 3, 32, 32) and y.tolist() == ref["test_batch"][1]


def test_cifar100_fake(no_system_data, monkeypatch):
    tmp = no_system_data
    _, ref = fake_cifar(tmp / "root", "cifar100")
    monkeypatch.setenv("PYOPTIM_DATA", str(tmp / "root"))
    x, y = D.load_dataset("cifar100", "train")
    assert x.shape == (4, 3, 32, 32) and y.tolist() == ref["train"][1]
    assert D.dataset_spec("cifar100").num_classes == 100


def test_cifar_corrupt(no_system_data):
    tmp = no_system_data
    folder, _ = fake_cifar(tmp / "root", "cifar10")
    bad = folder / "data_batch_3"
    bad.write_bytes(bad.read_bytes()[:50])
    with pytest.raises(D.DatasetCorruptError) as exc:
        D.load_dataset("cifar10", "train", data_dir=folder)
    assert str(bad) in str(exc.value)

    class Evil:
        def __reduce__(self):
            return (Path.touch, (tmp / "pwned",))

    evil = folder / "test_batch"
    evil.write_bytes(pickle.dumps({b"data": Evil()}))
    with pytest.raises(D.DatasetCorruptError, match="refusing") as exc:
        D.load_dataset("cifar10", "test", data_dir=folder)
    assert str(evil) in str(exc.value) and not (tmp / "pwned").exists()
    evil.write_bytes(pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}))
    with pytest.raises(D.DatasetCorruptError, match="3072"):
        D.load_dataset("cifar10", "test", data_dir=folder)


# ------------------------------------------------------------------------------ synthetic

def test_synthetic_deterministic_and_learnable():
    a = D.load_dataset("synthetic", "train", num_samples=400, num_classes=5, image_size=16,
                       in_channels=2)
    b = D.load_dataset("synthetic", "train", num_samples=400, num_classes=5, image_size=16,
                       in_channels=2)
    assert a[0].dtype == torch.uint8 and a[0].shape == (400, 2, 16, 16) and a[1].dtype == torch.int64
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert torch.bincount(a[1]).tolist() == [80] * 5
    c = D.load_dataset("synthetic", "train", num_samples=400, num_classes=5, image_size=16,
                       in_channels=2, seed=1)
    assert not torch.equal(a[0], c[0])
    xt, yt = D.load_dataset("synthetic", "test", num_samples=200, num_classes=5, image_size=16,
                            in_channels=2)
    assert not torch.equal(xt[:10], a[0][:10])
    # learnable: nearest class mean of the train split classifies the test split
    x, y = a[0].flatten(1).float(), a[1]
    means = torch.stack([x[y == k].mean(0) for k in range(5)])
    pred = torch.cdist(xt.flatten(1).float(), means).argmin(1)
    assert (pred == yt).float().mean() > 0.9
    default = D.load_dataset("synthetic")
    assert default[0].shape == (5000, 3, 32, 32)
    with pytest.raises(TypeError, match="synthetic"):
        D.load_dataset("cifar10", num_samples=10)


# --------------------------------------------------------------------------- augmentation

def test_crop_flip_expected_pixels():
    img = torch.arange(1, 17, dtype=torch.uint8).view(1, 1, 4, 4)
    x = img.repeat(3, 2, 1, 1)                       # 3 images, 2 channels
    dy, dx = torch.tensor([0, 1, 2]), torch.tensor([2, 1, 0])
    flips = torch.tensor([True, False, True])
    out = D.crop_flip(x, 1, dy, dx, flips)
    assert out.dtype == torch.uint8 and out.shape == x.shape
    # padded[r, c] = img[r - 1, c - 1] (0 outside); image 0 takes padded rows 0..3, cols 2..5,
    # then flips; image 1 the centre (identity); image 2 rows 2..5, cols 0..3, then flips
    exp0 = torch.tensor([[0, 0, 0, 0],
                         [0, 4, 3, 2],
                         [0, 8, 7, 6],
                         [0, 12, 11, 10]], dtype=torch.uint8)
    exp1 = img[0, 0]                                 # centre crop, no flip: identity
    exp2 = torch.tensor([[7, 6, 5, 0],
                         [11, 10, 9, 0],
                         [15, 14, 13, 0],
                         [0, 0, 0, 0]], dtype=torch.uint8)
    for i, e in enumerate((exp0, exp1, exp2)):
        assert torch.equal(out[i, 0], e) and torch.equal(out[i, 1], e)
    # float images, and against a per-image reference
    xf = torch.randn(5, 3, 8, 6)
    g = torch.Generator().manual_seed(123)
    dy, dx, fl = D.sample_crop_flip(5, 2, True, g)
    got = D.crop_flip(xf, 2, dy, dx, fl)
    xp = torch.nn.functional.pad(xf, (2, 2, 2, 2))
    for i in range(5):
        ref = xp[i, :, dy[i]:dy[i] + 8, dx[i]:dx[i] + 6]
        assert torch.equal(got[i], ref.flip(-1) if fl[i] else ref)
    # random_crop_flip: a fixed generator gives fixed, documented draws
    r1 = D.random_crop_flip(xf, 2, generator=torch.Generator().manual_seed(123))
    r2 = D.random_crop_flip(xf, 2, generator=torch.Generator().manual_seed(123))
    assert torch.equal(r1, got) and torch.equal(r2, got)
    assert torch.equal(D.crop_flip(xf, 0, *D.sample_crop_flip(5, 0, False)), xf)


# ---------------------------------------------------------------------------- DeviceLoader

def ids_loader(n=103, batch=10, **kw):
    """Images whose pixels encode the sample id, labels = ids: batches reveal what was served."""
    images = (torch.arange(n) % 251).to(torch.uint8).view(n, 1, 1, 1).expand(n, 1, 4, 4).contiguous()
    return D.DeviceLoader(images, torch.arange(n), batch, device="cpu", **kw)


def epoch_ids(loader, sizes=None):
    """One epoch's labels; ``sizes``: {batch index: new batch size} applied before that batch."""
    ids, it = [], iter(loader)
    i = 0
    while True:
        if sizes and i in sizes:
            loader.set_batch_size(sizes[i])
        try:
            _, y = next(it)
        except StopIteration:
            return ids
        ids.append(y.tolist())
        i += 1


def test_every_sample_once_per_epoch():
    L = ids_loader(103, 10, seed=5)
    assert len(L) == 11
    e0 = epoch_ids(L)
    assert [len(b) for b in e0] == [10] * 10 + [3]
    assert sorted(sum(e0, [])) == list(range(103)) and L.epoch == 1 and L.position == 0
    e1 = epoch_ids(L)
    assert sorted(sum(e1, [])) == list(range(103)) and e0 != e1       # reshuffled
    assert ids_loader(103, 10, seed=5).permutation(1).tolist() == sum(e1, [])
    Ld = ids_loader(103, 10, drop_last=True)
    e = sum(epoch_ids(Ld), [])
    assert len(e) == 100 == len(set(e)) and len(Ld) == 10
    assert sum(epoch_ids(ids_loader(20, 8, shuffle=False)), []) == list(range(20))


def test_batch_size_changes_mid_epoch():
    L = ids_loader(103, 8, seed=1)
    e = epoch_ids(L, sizes={2: 16, 4: 40})
    assert [len(b) for b in e] == [8, 8, 16, 16, 40, 15]
    assert sorted(sum(e, [])) == list(range(103))
    assert sum(e, []) == L.permutation(0).tolist()    # same permutation, no skip, no repeat
    assert L.batch_size == 40 and len(L) == 3
    with pytest.raises(ValueError):
        L.set_batch_size(0)


@pytest.mark.parametrize("drop_last", [False, True])
def test_sharding_disjoint_and_complete(drop_last):
    n = 101
    ranks = [ids_loader(n, 10, seed=3, rank=r, world_size=2, augment=True, crop_padding=1,
                        drop_last=drop_last) for r in range(2)]
    single = ids_loader(n, 10, seed=3, augment=True, crop_padding=1, drop_last=drop_last)
    assert ranks[0].local_batch_size == 5
    for epoch in range(2):
        seen = []
        its = [iter(r) for r in ranks]
        its1 = iter(single)
        step = 0
        while True:
            if step == 3:                               # the trainer grows the batch on all ranks
                for r in (*ranks, single):
                    r.set_batch_size(24)
            out = [next(it, None) for it in its]
            ref = next(its1, None)
            assert (out[0] is None) == (out[1] is None) == (ref is None)   # same step count
            if ref is None:
                break
            (x0, y0), (x1, y1) = out
            assert not set(y0.tolist()) & set(y1.tolist())
            # the two shards are the single-process batch, augmentation included
            assert torch.equal(torch.cat([y0, y1]), ref[1])
            assert torch.equal(torch.cat([x0, x1]), ref[0])
            seen += y0.tolist() + y1.tolist()
            step += 1
        if not drop_last:
            expect = n
        else:                                           # the grown batch drops a short tail
            expect = n - (n - 30) % 24 if epoch == 0 else n - n % 24
        assert len(seen) == len(set(seen)) == expect
    with pytest.raises(ValueError, match="multiple of world_size"):
        ranks[0].set_batch_size(25)


def test_loader_batches_augment_and_normalise():
    x, y = D.load_dataset("synthetic", num_samples=64, image_size=8, in_channels=3)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    L = D.DeviceLoader(x, y, 16, device="cpu", mean=mean, std=std, shuffle=False)
    xb, yb = next(iter(L))
    assert xb.dtype == torch.float32 and xb.shape == (16, 3, 8, 8) and yb.dtype == torch.int64
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(xb, (x[:16].float() / 255 - m) / s)
    A = D.DeviceLoader(x, y, 16, device="cpu", augment=True, crop_padding=2, seed=9,
                       channels_last=True, dtype=torch.bfloat16)
    xa, ya = next(iter(A))
    assert xa.shape == (16, 3, 8, 8) and xa.dtype == torch.bfloat16
    assert xa.is_contiguous(memory_format=torch.channels_last)
    # the loader's crops/flips are those of sample_crop_flip for (seed, epoch, position)
    g = torch.Generator().manual_seed(D.sources._mix(9, 0, 0, 0xA06))
    exp = D.crop_flip(x[A.permutation(0)[:16]], 2, *D.sample_crop_flip(16, 2, True, g))
    torch.testing.assert_close(xa, (exp.float() / 255).to(torch.bfloat16))
    # host placement (gather then copy) serves the same batches
    H = D.DeviceLoader(x, y, 16, device="cpu", augment=True, crop_padding=2, seed=9,
                       placement="host")
    Dv = D.DeviceLoader(x, y, 16, device="cpu", augment=True, crop_padding=2, seed=9)
    assert H.placement == "host" and Dv.placement == "device"
    for (a, b), (c, d) in zip(H, Dv):
        assert torch.equal(a, c) and torch.equal(b, d)


def test_state_dict_resume():
    def make(seed):
        return ids_loader(103, 8, seed=seed, augment=True, crop_padding=1)

    def drain(loader, steps):
        out = []
        for _ in range(steps):
            for x, y in loader:
                out.append((x, y))
                if len(out) in (4, 9):                 # grow the batch as a trainer would
                    loader.set_batch_size(loader.batch_size * 2)
                if len(out) == steps:
                    return out
        return out

    A = make(seed=7)
    first = drain(A, 6)                                # stop mid-epoch 0
    state = A.state_dict()
    assert state["epoch"] == 0 and state["position"] == 64 and state["batch_size"] == 16
    rest_a = drain(A, 12)                              # runs into epoch 1
    B = make(seed=0)
    B.load_state_dict(state)
    rest_b = drain(B, 12)
    assert len(rest_a) == len(rest_b) == 12 and A.epoch == B.epoch == 3
    for (xa, ya), (xb, yb) in zip(rest_a, rest_b):
        assert torch.equal(ya, yb) and torch.equal(xa, xb)
    # epoch 0 split across the checkpoint is still exactly once
    head = sum((y.tolist() for _, y in first), [])
    tail = sum((y.tolist() for _, y in rest_a[:3]), [])
    assert sorted(head + tail) == list(range(103))
    # a checkpoint taken after an epoch's last batch resumes at the next epoch
    C = ids_loader(20, 10, seed=2)
    it = iter(C)
    next(it), next(it)
    st = C.state_dict()
    assert st["position"] == 20 and C.epoch_finished
    E = ids_loader(20, 10, seed=2)
    E.load_state_dict(st)
    assert [y.tolist() for _, y in E] == [y.tolist() for _, y in C] and E.epoch == C.epoch == 2
    with pytest.raises(ValueError, match="not the same data set"):
        ids_loader(21, 10).load_state_dict(st)


def test_from_dataset_synthetic_trains():
    torch.manual_seed(0)
    kw = dict(num_samples=512, num_classes=4, image_size=12, in_channels=1)
    train = D.DeviceLoader.from_dataset("synthetic", "train", 64, device="cpu", dataset_kwargs=kw)
    test = D.DeviceLoader.from_dataset("synthetic", "test", 128, device="cpu",
                                       dataset_kwargs={**kw, "num_samples": 256})
    assert train.augment and train.shuffle and not test.augment and not test.shuffle
    assert train.spec.num_classes == 4 and train.crop_padding == 1
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(144, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(4):
        for x, y in train:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    with torch.no_grad():
        acc = sum((model(x).argmax(1) == y).sum().item() for x, y in test) / 256
    assert acc > 0.9


def test_specs_and_args():
    s = D.dataset_spec("fashion-mnist")
    assert (s.num_classes, s.in_channels, s.image_size, s.crop_padding) == (10, 1, (28, 28), 2)
    assert D.dataset_spec("cifar10").shape == (3, 32, 32) and D.dataset_spec("cifar10").crop_padding == 4
    with pytest.raises(ValueError, match="unknown data set"):
        D.load_dataset("imagenet")
    with pytest.raises(ValueError, match="split"):
        D.load_dataset("synthetic", "val")
    import argparse

    p = argparse.ArgumentParser()
    D.add_data_arguments(p)
    a = p.parse_args(["--dataset", "fashion-mnist", "--data-dir", "/x"])
    assert a.dataset == "fashion-mnist" and a.data_dir == "/x"
    assert D.fits_on_device(10**12, "cpu")


# ------------------------------------------------------------------------ real data, GPU

FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not (FASHION / "train-images-idx3-ubyte.gz").exists()
                    and not (FASHION / "train-images-idx3-ubyte").exists(),
                    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
def test_real_fashion_mnist(monkeypatch):
    monkeypatch.delenv("PYOPTIM_DATA", raising=False)
    x, y = D.load_dataset("fashion-mnist", "train")
    assert x.shape == (60000, 1, 28, 28) and x.dtype == torch.uint8
    assert torch.bincount(y).tolist() == [6000] * 10
    xt, yt = D.load_dataset("fashion-mnist", "test")
    assert xt.shape == (10000, 1, 28, 28) and int(yt.max()) == 9 and yt.unique().numel() == 10
    s = D.dataset_spec("fashion-mnist")
    assert abs(x.float().mean().item() / 255 - s.mean[0]) < 1e-3
    assert abs((x.float() / 255).std().item() - s.std[0]) < 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("placement", ["device", "host"])
def test_cuda_matches_cpu(placement):
    x, y = D.load_dataset("synthetic", num_samples=300, image_size=16)
    kw = dict(mean=(0.5,) * 3, std=(0.25,) * 3, augment=True, seed=4)
    G = D.DeviceLoader(x, y, 32, device="cuda", placement=placement, **kw)
    C = D.DeviceLoader(x, y, 32, device="cpu", **kw)
    assert G.placement == placement
    for i, ((a, b), (c, d)) in enumerate(zip(G, C)):
        if i == 3:
            G.set_batch_size(64)
            C.set_batch_size(64)
        assert a.is_cuda and b.is_cuda
        torch.testing.assert_close(a.cpu(), c)
        assert torch.equal(b.cpu(), d)


def test_sample_batches_leave_the_loader_where_it_was():
    A = ids_loader(50, 8, seed=3, augment=True, crop_padding=1)
    it = iter(A)
    first = [next(it) for _ in range(2)]
    state = A.state_dict()
    sampled = list(A.sample_batches(3, epoch=0))         # epoch 0's first batches, augmentation too
    assert A.state_dict() == state
    assert len(sampled) == 3
    for (xs, ys), (xf, yf) in zip(sampled[:2], first):
        assert torch.equal(ys, yf) and torch.equal(xs, xf)
    rest = list(it)                                      # the epoch continues as if never sampled
    assert sorted(sum((y.tolist() for _, y in first + rest), [])) == list(range(50))
    assert len(list(A.sample_batches(100))) == 7         # at most one epoch's batches


def test_epoch_order_serves_a_selection_in_full_batches_and_resumes():
    """``set_epoch_order``: the epoch serves exactly the given indices (repeats too) in full
    batches, ``last_indices`` names them, a checkpoint inside the epoch resumes it, the next epoch
    is a full shuffled pass again, ``sample_batches`` ignores the order, DDP ranks split it."""
    L = ids_loader(50, 8, seed=4)
    assert sorted(sum(epoch_ids(L), [])) == list(range(50)) and L.epoch == 1
    order = torch.tensor([5, 7, 7, 49, 0, 3, 11, 12, 13, 14, 20, 21, 22])
    L.set_epoch_order(1, order)
    assert L.epoch_length() == 13 and len(L) == 2 and L.batches_left() == 2
    it = iter(L)
    _, y = next(it)
    assert y.tolist() == order[:8].tolist() and L.last_indices.tolist() == order[:8].tolist()
    state = L.state_dict()
    rest = [y.tolist() for _, y in it]
    assert rest == [order[8:].tolist()] and L.epoch == 2 and L.epoch_length() == 50
    M = ids_loader(50, 8, seed=0)
    M.load_state_dict(state)                       # resumes inside the selected epoch
    assert [y.tolist() for _, y in M] == rest and M.epoch == 2
    assert sorted(sum(epoch_ids(L), [])) == list(range(50)) and L.epoch == 3
    L.set_epoch_order(3, order)
    assert sorted(sum((y.tolist() for _, y in L.sample_batches(100)), [])) == list(range(50))
    with pytest.raises(ValueError, match="started"):
        L.set_epoch_order(2, order)
    it = iter(L)
    next(it)
    with pytest.raises(ValueError, match="started"):
        L.set_epoch_order(3, order)
    for bad, msg in ((torch.tensor([0, 50]), r"\[0, 50\)"), (torch.tensor([-1, 2]), r"\[0, 50\)"),
                     (torch.tensor([[1, 2]]), "1-D"), (torch.tensor([0.5]), "integer"),
                     (torch.tensor([], dtype=torch.long), "fewer than world_size")):
        with pytest.raises(ValueError, match=msg):
            L.set_epoch_order(5, bad)
    ranks = [ids_loader(50, 8, seed=4, rank=r, world_size=2) for r in range(2)]
    for R in ranks:
        R.set_epoch_order(0, order)
    got = [[y.tolist() for _, y in R] for R in ranks]
    assert [a + b for a, b in zip(*got)] == [order[:8].tolist(), order[8:].tolist()]
