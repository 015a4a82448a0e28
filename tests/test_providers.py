"""Sessions on the provider asked for: a GPU provider that is installed but cannot start is an error, not a CPU run."""

from __future__ import annotations

import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from sd_utils.errors import ProviderUnavailableError
from sd_utils.providers import PROVIDERS, check_session_provider, session_options, session_providers


@pytest.fixture
def identity_model(tmp_path):
    value = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [1]) for name in ("x", "y")]
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "identity", value[:1], value[1:])
    path = tmp_path / "model.onnx"
    # an IR version every supported onnxruntime reads (a newer onnx package writes one older runtimes refuse)
    onnx.save(helper.make_model(graph, ir_version=9, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _session(path, name: str):
    provider = PROVIDERS[name]
    providers, provider_options = session_providers(provider, 0)
    return ort.InferenceSession(
        str(path), sess_options=session_options(provider), providers=providers, provider_options=provider_options
    )


@pytest.mark.parametrize("name", ["cuda", "dml"])
def test_a_session_that_fell_back_to_the_cpu_is_refused(identity_model, name):
    provider = PROVIDERS[name]
    if provider.execution_provider in ort.get_available_providers():
        pytest.skip(f"this onnxruntime starts {provider.execution_provider}")
    # what ONNX Runtime does when a provider's libraries do not load: a warning, then a CPU session
    with pytest.warns(UserWarning, match="not in available provider names"):
        session = _session(identity_model, name)
    assert session.get_providers() == ["CPUExecutionProvider"]

    with pytest.raises(ProviderUnavailableError) as error:
        check_session_provider(session, provider, "models/optimized/tiny/unet")
    message = str(error.value)
    assert "\n" not in message
    assert f"--provider {name}: ONNX Runtime could not start {provider.execution_provider}" in message
    assert "for models/optimized/tiny/unet and fell back to CPUExecutionProvider" in message
    assert provider.needs in message
    assert "use --provider cpu" in message


def test_a_session_on_its_provider_passes(identity_model):
    check_session_provider(_session(identity_model, "cpu"), PROVIDERS["cpu"], "unet")
