"""The adaptation tasks, the pretraining cache and fine-tuning of pyoptim.sparse.tasks, on tiny
versions (resolution 32, a few images a class, a few steps). Needs the real Fashion-MNIST (the
tasks are defined on its classes); skipped with the reason when it is not installed."""
import pytest
import torch

from pyoptim.data import DatasetNotFoundError, load_fashion_mnist
from pyoptim.sparse import SparseUpdateScheme, scheme_masks
from pyoptim.sparse import tasks as T

pytestmark = pytest.mark.usefixtures("one_thread")

RES = 32


@pytest.fixture(scope="module", autouse=True)
def fashion():
    try:
        return load_fashion_mnist("train")
    except DatasetNotFoundError as exc:
        pytest.skip(f"Fashion-MNIST is not installed: {str(exc).splitlines()[0]}")


TINY = T.PretrainConfig(resolution=RES, epochs=1, batch_size=16, train_per_class=16,
                        test_per_class=8)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    return T.pretrain(TINY, path=tmp_path_factory.mktemp("pt") / "tiny.pt", log=None)


def test_tasks_have_their_classes_shapes_and_sizes(fashion):
    raw_x, raw_y = fashion
    for name, spec in T.TASKS.items():
        t = T.make_task(name, resolution=RES, train_per_class=6, test_per_class=4)
        assert t.classes == spec.classes and t.num_classes == 5 and t.new_head == spec.new_head
        assert t.x_train.dtype == torch.uint8 and tuple(t.x_train.shape) == (30, 1, RES, RES)
        assert tuple(t.x_test.shape) == (20, 1, RES, RES)
        assert torch.equal(t.y_train.bincount(minlength=5), torch.full((5,), 6))
        assert torch.equal(t.y_test.bincount(minlength=5), torch.full((5,), 4))
    assert (T.TASKS["class_increment"].classes == T.TASKS["few_shot"].classes == (5, 6, 7, 8, 9))
    assert T.TASKS["shift"].classes == (0, 1, 2, 3, 4) and not T.TASKS["shift"].new_head
    # at 28x28 (no resize) every image is a training image of the class its label names
    t = T.make_task("class_increment", resolution=28, train_per_class=2, test_per_class=1)
    flat = raw_x.flatten(1)
    for img, label in zip(t.x_train, t.y_train):
        hits = (flat == img.flatten()).all(1).nonzero().flatten()
        assert hits.numel() >= 1 and int(raw_y[hits[0]]) == t.classes[int(label)]


def test_few_shot_keeps_100_a_class_chosen_by_the_seed():
    a = T.make_task("few_shot", resolution=RES, test_per_class=2)
    assert torch.equal(a.y_train.bincount(), torch.full((5,), 100))
    b = T.make_task("few_shot", resolution=RES, test_per_class=2)
    c = T.make_task("few_shot", resolution=RES, test_per_class=2, seed=1)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_train, b.y_train)
    assert a.config() == b.config() and a.config() != c.config()
    assert not torch.equal(a.x_train, c.x_train)


def test_shift_rotates_by_90_degrees_counter_clockwise():
    t = T.make_task("shift", resolution=RES, train_per_class=3, test_per_class=3)
    x, y = T.fashion_subset("test", (0, 1, 2, 3, 4), RES, per_class=3)
    assert torch.equal(t.y_test, y)
    n = RES - 1
    i, j = 3, 7                                       # out[i, j] = in[j, n - i]: the top-right
    assert torch.equal(t.x_test[..., i, j], x[..., j, n - i])   # corner goes to the top left
    assert torch.equal(t.x_test, torch.rot90(x, 1, (2, 3)))
    four = x
    for _ in range(4):
        four = T.shift_images(four, "rot90")
    assert torch.equal(four, x) and not torch.equal(t.x_test, x)
    with pytest.raises(ValueError, match="shift"):
        T.shift_images(x, "invert")


def test_bad_task_arguments():
    with pytest.raises(ValueError, match="task"):
        T.make_task("rotation")
    with pytest.raises(ValueError, match="classes"):
        T.fashion_subset("train", (3, 3))
    with pytest.raises(ValueError, match="resolution"):
        T.fashion_subset("train", (0,), resolution=4)


def test_pretrain_cache_round_trips_and_refuses_another_config(tmp_path):
    path = tmp_path / "pt.pt"
    first = T.pretrain(TINY, path=path, log=None)
    assert path.is_file() and not first.pretrain_info["cached"]
    assert 0.0 <= first.pretrain_info["accuracy"] <= 1.0
    again = T.pretrain(TINY, path=path, log=None)
    assert again.pretrain_info["cached"]
    for (k, a), (_, b) in zip(first.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k
    other = T.PretrainConfig(**{**TINY.__dict__, "epochs": 2})
    with pytest.raises(ValueError, match=r"epochs 1 != 2.*rebuild=True") as exc:
        T.pretrain(other, path=path, log=None)
    assert "\n" not in str(exc.value)
    with pytest.warns(UserWarning, match="retraining"):
        rebuilt = T.pretrain(other, path=path, rebuild=True, log=None)
    assert not rebuilt.pretrain_info["cached"] and T.pretrain(other, path=path).pretrain_info["cached"]
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a pretrained checkpoint"):
        T.pretrain(TINY, path=junk, log=None)
    # the default file name carries a hash of the config: two configs never share a file
    assert T.pretrained_path(TINY, tmp_path) != T.pretrained_path(other, tmp_path)
    assert T.pretrained_path(TINY, tmp_path).parent == tmp_path / "pretrained"


def _changed(before: dict, after: dict) -> dict:
    return {k: before[k] != after[k] for k in before}


@pytest.mark.parametrize("name", ["few_shot", "shift"])
def test_finetune_changes_only_what_the_scheme_trains(pretrained, name):
    task = T.make_task(name, resolution=RES, train_per_class=8, test_per_class=4)
    ref = T.prepare_model(pretrained, task, seed=3)
    scheme = SparseUpdateScheme.last_layers(ref, 4, {-1: 0.25, -4: 0.5})
    acc, tuned = T.finetune(pretrained, task, scheme, steps=3, lr=0.1, batch_size=8, seed=3,
                            return_model=True)
    assert 0.0 <= acc <= 1.0
    before, after = ref.state_dict(), tuned.state_dict()
    assert set(before) == set(after)
    masks = scheme_masks(ref, scheme)
    for key, mask in masks.items():
        changed = before[key] != after[key]
        if mask is None:                              # trained in full: it moved
            assert bool(changed.any()), key
        else:                                         # frozen entries bit-identical
            assert not bool((changed & ~mask).any()), key
            assert bool(changed.any()) == bool(mask.any()), key
    assert sum(m is None or bool(m.any()) for m in masks.values()) == 2 + 4 + 2   # head, biases, W
    for key in [k for k in before if k not in masks]:                     # buffers
        assert torch.equal(before[key], after[key]), key


def test_finetune_classifier_only_is_deterministic_per_seed(pretrained):
    task = T.make_task("class_increment", resolution=RES, train_per_class=8, test_per_class=4)
    runs = [T.finetune(pretrained, task, None, steps=4, lr=0.1, batch_size=8, seed=s,
                       return_model=True) for s in (0, 0, 1)]
    (a0, m0), (a1, m1), (_, m2) = runs
    assert a0 == a1
    s0, s1, s2 = m0.state_dict(), m1.state_dict(), m2.state_dict()
    assert all(torch.equal(s0[k], s1[k]) for k in s0)
    assert not torch.equal(s0["classifier.1.weight"], s2["classifier.1.weight"])
    plain = T.prepare_model(pretrained, task, seed=0).state_dict()
    moved = [k for k in plain if not torch.equal(plain[k], s0[k])]
    assert moved == ["classifier.1.weight", "classifier.1.bias"]
    assert pretrained.classifier[1].out_features == 5            # the model is not modified
