"""Replicas: the ranks beyond one video's split sample other videos of the batch side by side.

Video i of a batch runs on replica i mod R, in round i div R. Every replica runs the same number
of rounds, ceil(videos / R): with FSDP the weights are sharded over *all* ranks, so every rank
must run the same modules in the same order for the all-gathers to line up, and every rank
answers the same per-step cancel broadcast. A replica with no video left for the last round
repeats one and its result is dropped. Afterwards each video is broadcast from its replica, so
every rank holds the whole batch (rank 0 writes it; a decode over all ranks can use it).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.distributed as dist

from .mesh import ParallelGroups


def idle_replicas_note(videos: int, replicas: int) -> str | None:
    """One line when some replicas have no video of their own (their work is dropped), else None."""
    if videos >= replicas:
        return None
    return (f"{replicas} replicas but {videos} video{'s' if videos > 1 else ''}: {replicas - videos} replica(s) "
            f"repeat a video and their work is dropped; ask for {replicas} videos to use them")


def videos_of_replica(videos: int, replicas: int, replica: int) -> list[int]:
    """The video each round of `replica` samples; past the batch's end it repeats one (dropped)."""
    rounds = math.ceil(videos / replicas)
    return [(replica + k * replicas) % videos for k in range(rounds)]


def sample_videos(sample: Callable[[int, int], torch.Tensor], groups: ParallelGroups, videos: int) -> list[torch.Tensor]:
    """The final latents of videos 0..videos-1, on every rank.

    `sample(video, round)` runs one video on this rank's replica (all its ranks call it together)
    and returns the latent, the same on every rank of the replica.
    """
    plan = groups.plan
    mine: dict[int, torch.Tensor] = {}
    for round_index, video in enumerate(videos_of_replica(videos, plan.replicas, groups.replica)):
        latent = sample(video, round_index)
        mine.setdefault(video, latent)
    if plan.replicas == 1:  # every rank sampled every video
        return [mine[video] for video in range(videos)]
    like = next(iter(mine.values()))
    latents = []
    for video in range(videos):
        replica = video % plan.replicas
        latent = mine[video] if replica == groups.replica else torch.empty_like(like)  # a repeat is overwritten
        dist.broadcast(latent, src=plan.replica_groups()[replica][0])
        latents.append(latent)
    return latents
