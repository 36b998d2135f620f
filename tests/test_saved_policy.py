"""The default policy survives ``save_pretrained`` / ``from_pretrained``, whatever built-in it is.

A checkpoint stores its default policy as the spec ``parse_policy`` reads (config key
``mtp_policy``, written by ``policy_spec``), so a ``StaticK`` comes back a ``StaticK`` and a
``ConfAdapt`` with its exact threshold; a policy no spec names is refused with a message that says
what to do, before anything is written; a save from before ``mtp_policy`` (only ``mtp_threshold``
and ``mtp_k_max``) still loads as the ``ConfAdapt`` it was.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import attrs
import numpy as np
import numpy.typing as npt
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mtp_core import ConfAdapt, StaticK
from mtp_torch import MTPModel
from mtp_torch.decoding.policies import (
    parse_policy,
    policy_config_settings,
    policy_from_config,
    policy_spec,
)
from tests.synthetic import make_tokenizer, tiny_llama

# Every built-in policy over its whole parameter range (thresholds down to the smallest float).
thresholds = st.floats(min_value=0.0, max_value=1.0, exclude_min=True, allow_nan=False)
builtin_policies = st.one_of(
    st.builds(StaticK, k=st.integers(1, 10_000)),
    st.builds(ConfAdapt, threshold=thresholds, k_max=st.integers(1, 10_000)),
    st.builds(ConfAdapt, threshold=st.sampled_from([1, 1.0, np.float32(0.9), np.float64(0.3)])),
)


@given(policy=builtin_policies)
def test_every_builtin_policy_has_a_spec_that_reads_back_equal(policy) -> None:
    spec = policy_spec(policy)
    back = parse_policy(spec)
    assert back == policy and type(back) is type(policy)
    settings_ = policy_config_settings(policy)
    json.dumps(settings_)  # what config.json holds
    stored = policy_from_config(SimpleNamespace(**settings_))
    assert stored == policy and type(stored) is type(policy)


def fresh_mtp() -> MTPModel:
    tokenizer = make_tokenizer(chat=False)
    return MTPModel(tiny_llama(len(tokenizer), hidden_size=16, layers=1), tokenizer=tokenizer)


@pytest.fixture(scope="module")
def mtp() -> MTPModel:
    return fresh_mtp()


def config_json(directory: Path) -> dict[str, object]:
    loaded: dict[str, object] = json.loads((directory / "config.json").read_text("utf-8"))
    return loaded


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(policy=builtin_policies)
def test_the_default_policy_round_trips_through_a_save(
    mtp: MTPModel, tmp_path_factory: pytest.TempPathFactory, policy
) -> None:
    mtp.default_policy = policy
    target = mtp.save_pretrained(tmp_path_factory.mktemp("policy") / "ckpt")
    loaded = MTPModel.from_pretrained(target)
    assert loaded.default_policy == policy and type(loaded.default_policy) is type(policy)
    # Saved again from the loaded model, it stays the same.
    again = loaded.save_pretrained(target.parent / "again")
    assert MTPModel.from_pretrained(again).default_policy == policy


@pytest.mark.parametrize(
    ("policy", "threshold_key"),
    [(StaticK(3), None), (ConfAdapt(0.37, 5), 0.37), (ConfAdapt(), 0.9), (StaticK(1), None)],
)
def test_the_config_and_card_say_which_policy(
    tmp_path: Path, mtp: MTPModel, policy, threshold_key
) -> None:
    mtp.default_policy = policy
    target = mtp.save_pretrained(tmp_path / "ckpt")
    config = config_json(target)
    assert config["mtp_policy"] == policy_spec(policy)
    assert config["mtp_k_max"] == policy.num_positions
    assert config["mtp_threshold"] == threshold_key
    card = (target / "README.md").read_text("utf-8")
    assert f"(`mtp_policy`) | `{policy_spec(policy)}` |" in card
    assert ("(`mtp_threshold`)" in card) == isinstance(policy, ConfAdapt)
    built = f"StaticK({policy.k})" if isinstance(policy, StaticK) else "ConfAdapt("
    assert f"# {built}" in card


def test_a_static_save_overwritten_by_a_confadapt_save_loads_confadapt(tmp_path: Path) -> None:
    """The live config of a model loaded from a StaticK save carries its keys; a later save of
    another policy replaces every one of them."""
    mtp = fresh_mtp()
    mtp.default_policy = StaticK(4)
    target = mtp.save_pretrained(tmp_path / "ckpt")
    loaded = MTPModel.from_pretrained(target)
    assert loaded.model.config.mtp_policy == "static:4"
    loaded.default_policy = ConfAdapt(0.6, 2)
    loaded.save_pretrained(target)
    assert MTPModel.from_pretrained(target).default_policy == ConfAdapt(0.6, 2)
    # k_max= / threshold= store a ConfAdapt, the other setting from the current default.
    loaded.default_policy = StaticK(3)
    loaded.save_pretrained(target, threshold=0.7)
    assert MTPModel.from_pretrained(target).default_policy == ConfAdapt(0.7, 3)
    loaded.default_policy = ConfAdapt(0.55, 6)
    loaded.save_pretrained(target, k_max=2)
    assert MTPModel.from_pretrained(target).default_policy == ConfAdapt(0.55, 2)


@attrs.frozen
class EveryOther:
    """A policy of the user's own: no spec names it."""

    k: int = 4

    @property
    def num_positions(self) -> int:
        return self.k

    def accept(self, confidences: npt.ArrayLike) -> npt.NDArray[np.int64]:
        return np.full(np.asarray(confidences).shape[0], 2, dtype=np.int64)


@attrs.frozen
class StrictConfAdapt(ConfAdapt):
    """A subclass would read back as its base class: refused too."""


@pytest.mark.parametrize("policy", [EveryOther(), StrictConfAdapt(0.8, 4)])
def test_a_policy_with_no_spec_is_refused_before_anything_is_written(
    tmp_path: Path, policy
) -> None:
    mtp = fresh_mtp()
    mtp.default_policy = policy
    with pytest.raises(ValueError, match=r"has no spec.*parse_policy.*generate\(policy=") as error:
        mtp.save_pretrained(tmp_path / "ckpt")
    assert type(policy).__name__ in str(error.value)
    assert not (tmp_path / "ckpt").exists() and not list(tmp_path.iterdir())
    # Storing a ConfAdapt explicitly is the way out.
    target = mtp.save_pretrained(tmp_path / "ckpt", threshold=0.8)
    assert MTPModel.from_pretrained(target).default_policy == ConfAdapt(0.8, 4)


def test_a_save_from_before_the_policy_key_loads_as_its_confadapt(tmp_path: Path) -> None:
    """Saves written before ``mtp_policy`` hold only ``mtp_threshold`` and ``mtp_k_max``."""
    target = fresh_mtp().save_pretrained(tmp_path / "old", k_max=5, threshold=0.7)
    config = config_json(target)
    del config["mtp_policy"]
    (target / "config.json").write_text(json.dumps(config), encoding="utf-8")
    assert MTPModel.from_pretrained(target).default_policy == ConfAdapt(0.7, 5)
    del config["mtp_threshold"]
    (target / "config.json").write_text(json.dumps(config), encoding="utf-8")
    assert MTPModel.from_pretrained(target).default_policy == ConfAdapt(k_max=5)


def test_a_bad_policy_key_names_itself(tmp_path: Path) -> None:
    target = fresh_mtp().save_pretrained(tmp_path / "ckpt")
    for bad in ("fast", "static:0", 3):
        config = config_json(target)
        config["mtp_policy"] = bad
        (target / "config.json").write_text(json.dumps(config), encoding="utf-8")
        with pytest.raises(ValueError, match="mtp_policy"):
            MTPModel.from_pretrained(target)


def test_a_confadapt_spec_without_k_max_takes_the_stored_defaults() -> None:
    assert parse_policy("confadapt:0.8", StaticK(3)) == ConfAdapt(0.8, 3)
    assert parse_policy("confadapt", ConfAdapt(0.6, 7)) == ConfAdapt(0.6, 7)
    config = SimpleNamespace(mtp_policy="confadapt:0.5", mtp_k_max=6, mtp_threshold=0.9)
    assert policy_from_config(config) == ConfAdapt(0.5, 6)


def test_the_verify_policy_is_used_by_verify_and_round_trips(tmp_path: Path, mtp: MTPModel) -> None:
    assert mtp.verify_policy is None  # no key: verification drafts with the default policy
    prompts = torch.tensor([[3, 8, 1, 9, 4]])
    mtp.default_policy = ConfAdapt(0.5, 3)
    mtp.verify_policy = StaticK(3)
    chosen = mtp.generate(prompts, verify=True, max_new_tokens=12)
    explicit = mtp.generate(prompts, policy=StaticK(3), verify=True, max_new_tokens=12)
    assert chosen.num_forward_passes == explicit.num_forward_passes
    assert chosen.accepted_histogram.tolist() == explicit.accepted_histogram.tolist()
    assert torch.equal(chosen.sequences, explicit.sequences)
    unverified = mtp.generate(prompts, max_new_tokens=12)
    assert len(unverified.accepted_histogram) == 4  # ConfAdapt(0.5, 3): 0..3 tokens a step
    target = mtp.save_pretrained(tmp_path / "ckpt")
    assert config_json(target)["mtp_verify_policy"] == "static:3"
    loaded = MTPModel.from_pretrained(target)
    assert loaded.verify_policy == StaticK(3) and loaded.default_policy == ConfAdapt(0.5, 3)
    loaded.verify_policy = None
    again = loaded.save_pretrained(tmp_path / "again")
    assert config_json(again)["mtp_verify_policy"] is None
    assert MTPModel.from_pretrained(again).verify_policy is None


def test_a_bad_verify_policy_key_names_itself(tmp_path: Path, mtp: MTPModel) -> None:
    target = mtp.save_pretrained(tmp_path / "ckpt")
    config = config_json(target)
    config["mtp_verify_policy"] = "sometimes"
    (target / "config.json").write_text(json.dumps(config), "utf-8")
    with pytest.raises(ValueError, match="mtp_verify_policy='sometimes'"):
        MTPModel.from_pretrained(target)
