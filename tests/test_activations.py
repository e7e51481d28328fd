"""ActivationRecorder (regstory.activations): per-call-site pre-activations/activations for SeReNe, NEq, NEPENTHE."""
import pytest
import torch
from torch import nn

from regstory.activations import ActivationRecorder, Concat, NeuronMean, activation_sites

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]


def _tiny_mlp():
    """2 -> 2 (ReLU) -> 1 with hand-set weights: pre = W1 x + b1, post = relu(pre), y = W2 post + b2."""
    net = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, -1.0], [2.0, 0.5]]))
        net[0].bias.copy_(torch.tensor([0.5, -1.0]))
        net[2].weight.copy_(torch.tensor([[3.0, -2.0]]))
        net[2].bias.copy_(torch.tensor([0.25]))
    return net


X = torch.tensor([[1.0, 2.0], [3.0, -2.0]])
PRE = torch.tensor([[-0.5, 2.0], [5.5, 4.0]])  # [1-2+.5, 2+1-1], [3+2+.5, 6-1-1]
POST = torch.tensor([[0.0, 2.0], [5.5, 4.0]])


class Reuse(nn.Module):
    """One ReLU module called three times: three sites, relu, relu#1, relu#2."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 2, bias=False)
        self.relu = nn.ReLU(inplace=True)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[1.0, -1.0], [-2.0, 1.0]]))

    def forward(self, x):
        a = self.relu(x - 1)
        b = self.relu(self.fc(a) - 0.5)
        return self.relu(-b + 1)


def test_tiny_mlp_exact_values_and_no_hooks_outside():
    net = _tiny_mlp()
    rec = ActivationRecorder(net)
    with rec.capture():
        y = net(X)
    assert rec.sites == ["1"]
    assert torch.equal(rec.pre["1"], PRE) and torch.equal(rec.post["1"], POST)
    assert torch.equal(y, POST @ torch.tensor([[3.0], [-2.0]]) + 0.25)
    assert not rec.pre["1"].requires_grad  # detached by default
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in net.modules())
    before = rec.pre["1"]
    net(X * 2)  # outside the capture: nothing recorded
    assert rec.pre["1"] is before and set(rec.pre) == {"1"}


def test_named_linear_site_pre_is_its_output():
    net = _tiny_mlp()
    rec = ActivationRecorder(net, sites=["0", "2"])
    with rec.capture():
        y = net(X)
    assert rec.sites == ["0", "2"]
    assert torch.equal(rec.pre["0"], PRE) and rec.post["0"] is rec.pre["0"]
    assert torch.equal(rec.pre["2"], y.detach())
    with pytest.raises(KeyError):
        with ActivationRecorder(net, sites=["nope"]).capture():
            pass


def test_reused_module_gives_one_site_per_call():
    net = Reuse()
    x = torch.tensor([[0.0, 3.0], [2.0, 1.5]])
    rec = ActivationRecorder(net)
    with rec.capture():
        out = net(x)
    assert rec.sites == ["relu", "relu#1", "relu#2"]
    a_pre = x - 1
    a = a_pre.clamp(min=0)
    b_pre = a @ torch.tensor([[1.0, -1.0], [-2.0, 1.0]]).T - 0.5
    b = b_pre.clamp(min=0)
    c_pre = -b + 1
    for site, pre in zip(rec.sites, [a_pre, b_pre, c_pre]):
        assert torch.equal(rec.pre[site], pre), site  # the in-place ReLU did not overwrite its recorded input
        assert torch.equal(rec.post[site], pre.clamp(min=0)), site
    assert torch.equal(out, c_pre.clamp(min=0))
    assert net.relu.inplace is True  # restored
    with rec.capture():  # a second capture (and a second forward in it) gives the same names, not relu#3...
        net(x)
        net(x + 1)
    assert rec.sites == ["relu", "relu#1", "relu#2"]
    assert torch.equal(rec.pre["relu"], x)  # the last forward's tensors


def test_torchvision_resnet18_sites_per_block():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32).to(memory_format=torch.channels_last)
    rec = ActivationRecorder(net)
    with torch.no_grad(), rec.capture():
        ref = net(x)
    blocks = [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]
    assert rec.sites == ["relu"] + [s for b in blocks for s in (f"{b}.relu", f"{b}.relu#1")]
    assert len(rec.sites) == 17 and activation_sites(net) == ["relu"] + [f"{b}.relu" for b in blocks]
    for b in blocks:  # each call of the block's relu: pre = bn1 output, then bn2 output + shortcut
        assert torch.equal(rec.post[f"{b}.relu"], rec.pre[f"{b}.relu"].clamp(min=0))
        assert not torch.equal(rec.pre[f"{b}.relu"], rec.pre[f"{b}.relu#1"])  # two layers, not one merged
    b = net.layer1[0]  # block 1 by hand: relu(bn2(conv2(relu(bn1(conv1(x0))))) + x0)
    with torch.no_grad():
        stem = net.maxpool(rec.post["relu"])
        p1 = b.bn1(b.conv1(stem))
        p2 = b.bn2(b.conv2(p1.clamp(min=0))) + stem
    assert torch.allclose(rec.pre["layer1.0.relu"], p1) and torch.allclose(rec.pre["layer1.0.relu#1"], p2)
    assert rec.pre["layer1.0.relu"].is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert torch.equal(net(x), ref)  # in-place flags are back and the output is unchanged


@pytest.mark.parametrize("device", DEVICES)
def test_keep_graph_gradients_match_autograd(device):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 4, 3),
                        nn.Tanh(), nn.Flatten(), nn.Linear(16, 5), nn.GELU(), nn.Linear(5, 3)).double().to(device)
    x = torch.randn(4, 2, 4, 4, dtype=torch.double).to(device)
    rec = ActivationRecorder(net, keep_graph=True)
    with rec.capture():
        logits = net(x)
    assert rec.sites == ["2", "4", "7"]
    tensors = [rec.pre[s] for s in rec.sites] + [rec.post[s] for s in rec.sites]
    expected = torch.autograd.grad(logits.sum(), tensors, retain_graph=True)
    for t in tensors:  # torch.autograd.grad also fills retained .grad (torch >= 2): start the backward from None
        t.grad = None
    logits.sum().backward()  # SeReNe's lower bound: one backward of the sum of the logits
    same = torch.equal if device == "cpu" else torch.allclose  # cuDNN may pick another algorithm the second time
    for t, g in zip(tensors, expected):
        assert t.grad is not None and same(t.grad, g)
    # by hand for the last site: d sum(logits) / d post = column sums of the head's weight
    assert torch.equal(rec.post["7"].grad, net[8].weight.sum(0).expand(4, 5))
    assert net[1].training


def test_keep_graph_named_conv_site_and_no_grad():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 2))
    x = torch.randn(3, 1, 4, 4)
    rec = ActivationRecorder(net, sites=["0"], keep_graph=True)
    with rec.capture():
        out = net(x)
    (g,) = torch.autograd.grad(out.sum(), [rec.pre["0"]], retain_graph=True)
    rec.pre["0"].grad = None
    out.sum().backward()
    assert torch.equal(rec.pre["0"].grad, g)
    with torch.no_grad(), rec.capture():  # nothing to keep: no error, tensors without history
        net(x)
    assert not rec.pre["0"].requires_grad and torch.equal(rec.pre["0"], net[0](x).detach())


def test_hooks_removed_and_inplace_restored_after_exception():
    net = Reuse()
    rec = ActivationRecorder(net)
    with pytest.raises(ZeroDivisionError):
        with rec.capture():
            net(torch.ones(1, 2))
            assert net.relu.inplace is False
            raise ZeroDivisionError
    assert net.relu.inplace is True
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in net.modules())
    with rec.capture():  # usable again
        net(torch.ones(1, 2))
    assert len(rec.sites) == 3


def test_in_place_modification_of_a_recorded_tensor_is_detected():
    class AddInPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(2, 2)
            self.relu = nn.ReLU()

        def forward(self, x):
            out = self.fc(x)
            out += x  # modifies the recorded output of fc
            return self.relu(out)

    rec = ActivationRecorder(AddInPlace(), sites=["fc"])
    with pytest.raises(RuntimeError, match="modified in place"):
        with rec.capture():
            rec.model(torch.ones(1, 2))


@pytest.mark.parametrize("device", DEVICES)
def test_neuron_mean_reducer_over_batches_and_positions(device):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(48, 4), nn.ReLU()).to(device)
    batches = [torch.randn(2, 1, 4, 4).to(device), torch.randn(3, 1, 4, 4).to(device)]
    rec = ActivationRecorder(net)
    with torch.no_grad(), rec.capture(reduce=NeuronMean):
        for x in batches:
            net(x)
    with torch.no_grad():
        pre1 = torch.cat([net[0](x) for x in batches])  # [5, 3, 4, 4]
        pre2 = torch.cat([net[3](net[2](net[1](net[0](x)))) for x in batches])  # [5, 4]
    assert rec.pre["1"].shape == (3,) and rec.post["4"].shape == (4,)
    assert torch.allclose(rec.pre["1"], pre1.double().mean((0, 2, 3)).float(), atol=1e-6, rtol=0)
    assert torch.allclose(rec.post["1"], pre1.clamp(min=0).double().mean((0, 2, 3)).float(), atol=1e-6, rtol=0)
    assert torch.allclose(rec.pre["4"], pre2.mean(0), atol=1e-6, rtol=0)
    # p_on (NEPENTHE eq. 2.16): fraction of positive pre-activations per neuron, exact
    with torch.no_grad(), rec.capture(reduce=lambda: NeuronMean(transform=lambda z: z > 0), record=("pre",)):
        for x in batches:
            net(x)
    assert set(rec.post) == set()
    assert torch.equal(rec.pre["1"], ((pre1 > 0).double().sum((0, 2, 3)) / 80).float())
    assert torch.equal(rec.pre["4"], ((pre2 > 0).double().sum(0) / 5).float())


def test_hand_computed_neuron_mean_and_concat():
    net = _tiny_mlp()
    rec = ActivationRecorder(net, sites=["0", "1"])
    with torch.no_grad(), rec.capture(reduce=NeuronMean):
        net(X[:1])
        net(X[1:])
    assert torch.equal(rec.pre["0"], torch.tensor([2.5, 3.0]))  # mean of [-0.5, 5.5] and [2, 4]
    assert rec.post["0"] is rec.pre["0"]
    assert torch.equal(rec.post["1"], torch.tensor([2.75, 3.0]))  # mean of [0, 5.5] and [2, 4]
    with torch.no_grad(), rec.capture(reduce=Concat):
        net(X[:1])
        net(X[1:])
    assert torch.equal(rec.pre["1"], PRE) and torch.equal(rec.post["1"], POST)
    with pytest.raises(ValueError):
        with ActivationRecorder(net, keep_graph=True).capture(reduce=NeuronMean):
            pass


def test_train_mode_and_model_changed_between_captures():
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Dropout(0.5, inplace=True), nn.Linear(4, 2))
    net.train()
    rec = ActivationRecorder(net)
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(1))
    with rec.capture():
        net(x)
    assert rec.sites == ["2"] and torch.equal(rec.post["2"], rec.pre["2"].clamp(min=0))
    assert net[3].inplace is True
    net[2] = nn.Identity()  # NEPENTHE replaces a linear-regime rectifier: the next capture sees the change
    with rec.capture():
        net(x)
    assert rec.sites == [] and rec.pre == {}
