import pytest
import torch
import torchvision
from torch import nn

from ptq.ir.capture import capture
from ptq.errors import UnsupportedOpError
from ptq.ir.floatops import run_float


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_capture_matches_torchvision_model(name):
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    g = capture(model, (3, 64, 64))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
    out = run_float(g, x)
    assert torch.allclose(out, ref, atol=1e-4 * max(1.0, float(ref.abs().max())))
    kinds = {op.kind for op in g.ops}
    assert "conv" in kinds and "linear" in kinds and "add" in kinds
    # BatchNorm is folded: there is no op left for it and convs are marked
    assert sum(op.attrs.get("bn_folded", False) for op in g.ops) == sum(
        isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_capture_efficientnet_lite0_real_weights():
    from ptq.models import load_model
    lm = load_model("efficientnet_lite0")
    g = capture(lm.module, lm.input_shape)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        ref = lm.module(x)
    assert torch.allclose(run_float(g, x), ref, atol=1e-3)
    # ReLU6 is fused as a clamp to [0, 6], never turned into ReLU
    acts = [op.attrs.get("act") for op in g.ops if op.kind == "conv" and op.attrs.get("act")]
    assert acts and all(a == [0.0, 6.0] for a in acts)


def test_mlp_capture():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    g = capture(model, (3, 4))
    x = torch.randn(5, 3, 4)
    assert torch.allclose(run_float(g, x), model(x), atol=1e-5)


def test_unsupported_op_names_op_and_module():
    class Gate(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)

        def forward(self, x):
            y = self.conv(x)
            return y * y

    with pytest.raises(UnsupportedOpError, match=r"mul"):
        capture(Gate().eval(), (3, 8, 8))


@pytest.mark.parametrize("wrap,what", [(lambda y: (y, y), "a tuple of 2 tensors"),
                                       (lambda y: {"logits": y}, "a dict with keys 'logits'")])
def test_structured_outputs_are_refused_at_capture(wrap, what):
    """Found right after export, naming the type, not after the whole pipeline ran."""
    from ptq.errors import ModelError

    class Heads(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(12, 3)

        def forward(self, x):
            return wrap(self.fc(x.flatten(1)))

    with pytest.raises(ModelError, match=rf"model Heads returns {what}, not one tensor"):
        capture(Heads().eval(), (3, 4))
