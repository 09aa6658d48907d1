"""Two gloo processes on CPU must give the loss and gradients of one process on the concatenated batch."""

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pdclip.config import METHODS, LossConfig
from pdclip.distributed import gather_features, world
from pdclip.methods import method_loss
from pdclip.positives import caption_keys

B_GLOBAL, D_IN, D = 8, 6, 5


class Towers(nn.Module):
    def __init__(self):
        super().__init__()
        self.image = nn.Linear(D_IN, D)
        self.text = nn.Linear(D_IN, D)

    def forward(self, x_img, x_txt):
        norm = nn.functional.normalize
        return norm(self.image(x_img), dim=-1), norm(self.text(x_txt), dim=-1)


def make_problem():
    torch.manual_seed(0)
    student, teacher = Towers(), Towers()
    x_img, x_txt = torch.randn(B_GLOBAL, D_IN), torch.randn(B_GLOBAL, D_IN)
    return student, teacher, x_img, x_txt


# Pairs 1 and 6 (on different ranks) and 2 and 3 share a caption: equality is decided on the global batch.
CAPTIONS = ["a", "the city", "untitled", "Untitled ", "b", "c", "the  city", "d"]


def loss_and_grads(method: str, rank: int, world_size: int, wrap_ddp: bool, multi_positive: bool = False):
    student, teacher, x_img, x_txt = make_problem()
    model = DistributedDataParallel(student) if wrap_ddp else student
    rows = slice(rank * B_GLOBAL // world_size, (rank + 1) * B_GLOBAL // world_size)
    img, txt = model(x_img[rows], x_txt[rows])
    with torch.no_grad():
        t_img, t_txt = teacher(x_img[rows], x_txt[rows])
    out = method_loss(
        LossConfig(method=method, multi_positive=multi_positive), img, txt, torch.tensor(10.0),
        logit_scale_soft=torch.tensor(30.0), teacher_image_features=t_img, teacher_text_features=t_txt,
        teacher_logit_scale=torch.tensor(12.0), alpha=0.5, generator=torch.Generator().manual_seed(7),
        caption_keys=caption_keys(CAPTIONS[rows]),
    )
    out.loss.backward()
    grads = {k: p.grad.clone() for k, p in student.named_parameters()}
    return out.loss.detach(), grads, out.targets_i2t


def worker(rank: int, world_size: int, port: int, path: str):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    try:
        assert world() == (rank, world_size)
        x = torch.full((2, 3), float(rank), requires_grad=True)
        gathered = gather_features(x, with_grad=True)
        gathered.sum().backward()
        results = {"gather": gathered.detach(), "gather_grad": x.grad}
        for method in METHODS:
            results[method] = loss_and_grads(method, rank, world_size, wrap_ddp=True)
            results[f"{method}-multi"] = loss_and_grads(method, rank, world_size, wrap_ddp=True, multi_positive=True)
        torch.save(results, f"{path}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    path = tmp_path_factory.mktemp("ddp")
    mp.spawn(worker, args=(2, free_port(), str(path)), nprocs=2, join=True)
    return [torch.load(path / f"rank{r}.pt", weights_only=True) for r in range(2)]


def test_gather_concatenates_in_rank_order_and_routes_gradients(two_rank_results):
    for r, res in enumerate(two_rank_results):
        assert torch.equal(res["gather"], torch.cat([torch.zeros(2, 3), torch.ones(2, 3)]))
        # both ranks' sums depend on every slice: the gradient of each slice is world_size
        assert torch.equal(res["gather_grad"], torch.full((2, 3), 2.0)), r


@pytest.mark.parametrize("multi_positive", [False, True], ids=["one-hot", "multi-positive"])
@pytest.mark.parametrize("method", METHODS)
def test_two_processes_match_one_process(two_rank_results, method, multi_positive):
    loss_1, grads_1, targets_1 = loss_and_grads(method, 0, 1, wrap_ddp=False, multi_positive=multi_positive)
    if multi_positive and method == "clip":  # the cross-rank duplicate is a positive of both pairs
        assert targets_1[1, 6] > 0 and targets_1[6, 1] > 0
    for res in two_rank_results:
        loss_2, grads_2, targets_2 = res[f"{method}-multi" if multi_positive else method]
        torch.testing.assert_close(loss_2, loss_1)
        torch.testing.assert_close(targets_2, targets_1)  # targets see the global batch
        for name in grads_1:  # DDP averages; the all-gather's backward sums: together, the full-batch gradient
            torch.testing.assert_close(grads_2[name], grads_1[name], msg=f"{method} {name}")
