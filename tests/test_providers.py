"""Sessions on the provider asked for: a GPU provider that is installed but cannot start is an error (or, for
``--provider auto``, the next provider), found before anything is optimized, never a quiet CPU run.

ONNX Runtime's CPU build shows the behaviour a broken GPU install has: asked for CUDA or DirectML, it makes the session
on the CPU with a warning. The CLI tests make ``available_execution_providers`` list CUDA as ``onnxruntime-gpu`` does
without its CUDA libraries; the sessions are real.
"""

from __future__ import annotations

import logging

import onnxruntime as ort
import pytest

from sd_utils.errors import ProviderUnavailableError
from sd_utils.runtime import providers
from sd_utils.runtime.providers import (
    PROVIDERS,
    check_session_provider,
    new_session,
    probe_model,
    start_problem,
)
from stable_diffusion_xl import main

GPU_PROVIDERS = ["cuda", "dml"]


def _skip_if_it_starts(name: str) -> None:
    if PROVIDERS[name].execution_provider in ort.get_available_providers():
        pytest.skip(f"this onnxruntime starts {PROVIDERS[name].execution_provider}")


@pytest.fixture
def identity_model(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(probe_model())
    return path


@pytest.mark.parametrize("name", GPU_PROVIDERS)
def test_a_session_that_fell_back_to_the_cpu_is_refused(identity_model, name):
    _skip_if_it_starts(name)
    provider = PROVIDERS[name]
    with pytest.warns(UserWarning, match="not in available provider names"):
        session = new_session(str(identity_model), provider)
    assert session.get_providers() == ["CPUExecutionProvider"]

    with pytest.raises(ProviderUnavailableError) as error:
        check_session_provider(session, provider, "models/optimized/tiny/unet")
    message = str(error.value)
    assert "\n" not in message
    assert f"--provider {name}: ONNX Runtime could not start {provider.execution_provider}" in message
    assert "(the session of models/optimized/tiny/unet fell back to CPUExecutionProvider)" in message
    assert provider.needs in message
    assert message.endswith("or use --provider cpu")


def test_a_session_on_its_provider_passes(identity_model):
    check_session_provider(new_session(str(identity_model), PROVIDERS["cpu"]), PROVIDERS["cpu"], "unet")


@pytest.mark.parametrize("name", GPU_PROVIDERS)
def test_start_problem_says_where_the_probe_session_went(name):
    _skip_if_it_starts(name)
    assert start_problem(PROVIDERS[name]) == "a session fell back to CPUExecutionProvider"
    assert start_problem(PROVIDERS["cpu"]) is None


@pytest.fixture
def cuda_listed_but_broken(monkeypatch):
    """What ``onnxruntime-gpu`` without the CUDA libraries it needs answers."""
    _skip_if_it_starts("cuda")
    monkeypatch.setattr(
        providers, "available_execution_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )


def test_a_provider_that_does_not_start_stops_the_run_before_optimizing(cuda_listed_but_broken, tmp_path, capsys):
    models = tmp_path / "models"
    args = ["--models_dir", str(models), "--cache_dir", str(tmp_path / "cache"), "--model_id", "tiny"]
    code = main([*args, "--provider", "cuda", "--prompt", "x", "--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == ProviderUnavailableError.exit_code
    assert len(err.strip().splitlines()) == 1, err
    assert "--provider cuda: ONNX Runtime could not start CUDAExecutionProvider (a session fell back to" in err
    assert not (models / "optimized").exists()  # nothing was optimized for a provider that cannot run it
    assert not (tmp_path / "out").exists()


def test_auto_goes_on_past_a_provider_that_does_not_start(cuda_listed_but_broken, caplog):
    with caplog.at_level(logging.WARNING, logger="sd_utils.runtime.providers"):
        assert providers.resolve_provider("auto") is PROVIDERS["cpu"]
    assert "--provider auto: CUDAExecutionProvider is installed but does not start (a session fell back" in caplog.text
    # optimizing alone needs no running provider: auto still picks the installed one
    assert providers.resolve_provider("auto", for_inference=False) is PROVIDERS["cuda"]
