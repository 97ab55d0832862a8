"""Process groups for expert parallelism, in DeepSpeed's convention.

With W ranks and expert-parallel size `ep`:
- dense parameters are replicated on all W ranks; their gradients are averaged over the world;
- the routed experts of every MoE layer are split into `ep` contiguous shards; rank r holds
  shard r % ep. Expert-parallel (EP) group: the ep consecutive ranks [k·ep, (k+1)·ep) that
  together hold every expert and exchange tokens by all-to-all;
- expert-data-parallel (EDP) group: the W/ep ranks {r' : r' % ep == r % ep} holding the same
  shard; expert gradients are summed over it (and divided by W, the data-parallel size, because
  every token of the world reached exactly one replica of its expert).

    W = 4, ep = 2:   EP groups [0 1] [2 3]    EDP groups [0 2] [1 3]

The groups are DeepSpeed's own (`deepspeed.utils.groups`, named `ep_size_{ep}`), created here
once, so the engine's MoE gradient reduction and ZeRO partitioning use exactly these. A
pipeline dimension would split the world first and build these groups inside each stage.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from model import ConfigError


@dataclass
class ExpertLayout:
    world_size: int
    rank: int
    ep: int
    n_routed_experts: int
    group_name: str  # DeepSpeed's name for the EP/EDP group pair
    ep_group: object | None  # ProcessGroup; None when ep == 1
    edp_group: object | None

    @property
    def ep_rank(self) -> int:
        return self.rank % self.ep

    @property
    def edp_size(self) -> int:
        return self.world_size // self.ep

    @property
    def local_experts(self) -> int:
        return self.n_routed_experts // self.ep

    @property
    def expert_range(self) -> tuple[int, int]:
        """[first, last) global expert ids held by this rank."""
        start = self.ep_rank * self.local_experts
        return start, start + self.local_experts

    def ep_group_ranks(self) -> list[int]:
        base = self.rank - self.ep_rank
        return list(range(base, base + self.ep))

    def edp_group_ranks(self) -> list[int]:
        return list(range(self.ep_rank, self.world_size, self.ep))


def validate(ep: int, world_size: int, n_routed_experts: int) -> None:
    if ep < 1:
        raise ConfigError("parallel.ep", ep, "must be >= 1")
    if n_routed_experts % ep:
        raise ConfigError("parallel.ep", ep, f"must divide model.n_routed_experts={n_routed_experts}")
    if world_size % ep:
        raise ConfigError("parallel.ep", ep, f"must divide the world size {world_size} (ranks in the job)")


def build_expert_layout(ep: int, n_routed_experts: int) -> ExpertLayout:
    """Create (once) and return the EP/EDP groups for this rank. Collective: every rank calls it."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    validate(ep, world, n_routed_experts)
    name = f"ep_size_{ep}"
    if ep == 1 and world == 1:
        return ExpertLayout(world, rank, ep, n_routed_experts, name, None, None)
    from deepspeed.utils import groups

    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep)
    layout = ExpertLayout(world, rank, ep, n_routed_experts, name,
                          groups._get_expert_parallel_group(name), groups._get_expert_data_parallel_group(name))
    # DeepSpeed's layout must be the one described above; fail loudly if a version changes it.
    got_ep = dist.get_process_group_ranks(layout.ep_group)
    got_edp = dist.get_process_group_ranks(layout.edp_group)
    if got_ep != layout.ep_group_ranks() or got_edp != layout.edp_group_ranks():
        raise RuntimeError(f"DeepSpeed built EP group {got_ep} / EDP group {got_edp}; expected "
                           f"{layout.ep_group_ranks()} / {layout.edp_group_ranks()}")
    return layout
