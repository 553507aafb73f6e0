"""Prefix-affinity routing (serve/routing.py): the plan is plain data, driven here without Ray running; the last
tests drive the Ray RequestRouter subclass itself with stand-in replicas (no cluster)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
from types import SimpleNamespace

import pytest

from codegen_deploy.serve.routing import (
    PrefixRecords,
    RoutedRequest,
    RoutingConfig,
    plan_route,
    prompt_blocks,
    routing_text,
)

CONFIG = RoutingConfig(block_chars=16, imbalance_threshold=2)
REPLICAS = ["r0", "r1", "r2"]


def editor_file(i: int) -> str:
    """A file of editor i: its own text from the first character (no shared header)."""
    return f"{i:04d}" + "".join(f"# editor {i} line {n}: x_{i}_{n} = {n * i}\n" for n in range(12))


class Cluster:
    """The router's decisions over simulated replicas: Ray tries a plan's ranks in order and takes the least
    loaded replica of the first rank (the first one on a tie), as _select_from_candidate_replicas does."""

    def __init__(self, config: RoutingConfig = CONFIG, replicas=REPLICAS, seed: int = 0):
        self.config = config
        self.records = PrefixRecords(config.max_blocks_per_replica)
        self.loads = dict.fromkeys(replicas, 0)
        self.rng = random.Random(seed)

    def route(self, text: str, hold: bool = False):
        """The replica that gets a prompt (and the plan); `hold` keeps it ongoing there."""
        blocks = prompt_blocks(text, self.config)
        order = self.rng.sample(list(self.loads), len(self.loads))
        loads = {r: self.loads[r] for r in order}
        matched = {r: self.records.matched(r, blocks) for r in order}
        plan = plan_route(loads, matched, len(blocks), self.config)
        rank = next(rank for rank in plan.ranks if rank)
        chosen = min(rank, key=loads.__getitem__)
        self.records.record(chosen, blocks)
        if hold:
            self.loads[chosen] += 1
        return chosen, plan


def test_affinity_each_editors_next_keystrokes_go_to_the_replica_of_its_first():
    cluster = Cluster()
    files = {i: editor_file(i) for i in range(6)}
    homes = {i: cluster.route(files[i])[0] for i in files}
    for keystroke in range(1, 30):
        for i, text in files.items():
            typed = text + f"y_{keystroke} = " + "z" * keystroke  # the file grows at its end, as typing does
            chosen, plan = cluster.route(typed)
            assert (chosen, plan.reason) == (homes[i], "affinity"), (i, keystroke)
    # With equal loads the first keystrokes spread (random ties): affinity does not pile editors on one replica.
    assert len(set(homes.values())) > 1


def test_affinity_holds_for_an_edit_in_the_middle_of_the_file():
    cluster = Cluster()
    text = editor_file(1)
    home, _ = cluster.route(text)
    cluster.route(editor_file(2))
    edited = text[: len(text) // 2] + "EDIT" + text[len(text) // 2 :]  # half the file's blocks still match
    chosen, plan = cluster.route(edited)
    assert (chosen, plan.reason) == (home, "affinity")


def test_imbalance_a_hot_affine_replica_is_skipped_for_the_least_loaded():
    cluster = Cluster()
    text = editor_file(1)
    home, _ = cluster.route(text)
    cluster.loads[home] = CONFIG.imbalance_threshold  # exactly at the threshold: affinity still holds
    chosen, plan = cluster.route(text + "a")
    assert (chosen, plan.reason) == (home, "affinity")
    cluster.loads[home] = CONFIG.imbalance_threshold + 1  # past it: by load
    chosen, plan = cluster.route(text + "ab")
    assert plan.reason == "imbalanced" and plan.affine == home
    assert chosen != home and cluster.loads[chosen] == 0


def test_imbalance_is_measured_from_the_affine_replica_not_the_busiest():
    # One busy replica elsewhere does not turn affinity off (Ray's router compares busiest and least loaded).
    cluster = Cluster()
    text = editor_file(1)
    home, _ = cluster.route(text)
    other = next(r for r in REPLICAS if r != home)
    cluster.loads[other] = 50
    assert cluster.route(text + "a")[1].reason == "affinity"


def test_affinity_then_the_others_by_load_when_the_affine_replica_is_full():
    # The plan's second rank is every other replica by load: Ray falls back to it when the first has no room.
    loads = {"r0": 3, "r1": 1, "r2": 0}
    plan = plan_route(loads, {"r0": 0, "r1": 4, "r2": 0}, 4, CONFIG)
    assert plan.ranks == (("r1",), ("r2", "r0")) and plan.reason == "affinity"


def test_unknown_prompt_goes_to_the_least_loaded_replica():
    cluster = Cluster()
    for i in range(3):
        cluster.route(editor_file(i), hold=True)  # one ongoing request each
    cluster.loads["r1"] = 0
    chosen, plan = cluster.route(editor_file(99))
    assert (chosen, plan.reason) == ("r1", "no match")
    # A request without a prompt (/health, /v1/models) too; a prompt shorter than a block matches nothing.
    assert cluster.route("")[0] == "r1"
    assert cluster.route(editor_file(0)[: CONFIG.block_chars - 1])[1].reason == "no match"


def test_unknown_prompts_with_equal_loads_spread_over_replicas():
    cluster = Cluster()
    assert {cluster.route(editor_file(100 + i))[0] for i in range(30)} == set(REPLICAS)


def test_a_short_shared_header_is_no_match():
    # A licence header shared by every file (less than min_match_fraction of the prompt) pulls nothing.
    config = RoutingConfig(block_chars=16, min_match_fraction=0.5)
    cluster = Cluster(config)
    header = "# Copyright (c) Example Corp. All rights reserved.\n"
    cluster.route(header + editor_file(1))
    assert cluster.route(header + editor_file(2))[1].reason == "no match"
    assert cluster.route(header + editor_file(1) + "x")[1].reason == "affinity"


def test_records_are_bounded_and_keep_each_prompts_start():
    records = PrefixRecords(max_blocks=50)
    config = RoutingConfig(block_chars=8)
    for i in range(200):
        records.record("r0", prompt_blocks(editor_file(i), config))
        assert records.size("r0") <= 50
    last = prompt_blocks(editor_file(199), config)
    assert len(last) > 50  # longer than the cap: what is kept is its start
    assert records.matched("r0", last) == 50
    assert records.matched("r0", prompt_blocks(editor_file(0), config)) == 0  # the oldest is gone


def test_records_of_gone_replicas_are_dropped():
    records = PrefixRecords()
    blocks = prompt_blocks(editor_file(1), CONFIG)
    for r in REPLICAS:
        records.record(r, blocks)
    records.keep_only(["r0", "r2"])
    records.forget("r2")
    assert records.replicas() == ["r0"] and records.matched("r1", blocks) == 0


def test_prompt_blocks_share_exactly_the_common_whole_blocks():
    a, b = "x" * 40 + "abc", "x" * 40 + "abd"
    ha, hb = prompt_blocks(a, CONFIG), prompt_blocks(b, CONFIG)
    assert ha == hb and len(ha) == 2  # 43 characters: two whole blocks of 16, the tail is not matched
    c = "y" + "x" * 47
    assert prompt_blocks(c, CONFIG)[0] != ha[0] and prompt_blocks(c, CONFIG)[1] != ha[1]
    assert len(prompt_blocks("x" * 10_000, RoutingConfig(block_chars=16, max_chars=160))) == 10


def test_config_rejects_nonsense():
    with pytest.raises(ValueError):
        RoutingConfig(block_chars=0)
    with pytest.raises(ValueError):
        RoutingConfig(min_match_fraction=2.0)


@pytest.mark.parametrize(
    ("path", "body", "text"),
    [
        ("/v1/completions", {"prompt": "def f():\n"}, "def f():\n"),
        ("/v1/completions", {"prompt": ["import os\n", "x"]}, "import os\n"),
        ("/v1/completions", {"prompt": [1, 23]}, "1,23,"),
        ("/v1/completions", {"prompt": [[5, 6], [7]]}, "5,6,"),
        ("/v1/engines/codegen/completions", {"prompt": "abc"}, "abc"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, "user\nhi\n"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}]}]},
            "user\na\n",
        ),
        (
            "/infill",
            {"input_extra": [{"filename": "a.py", "text": "A"}], "input_prefix": "def f", "input_suffix": "S"},
            "def f--- a.py ---\nA\n",  # the file first: the ring of other files rotates
        ),
        ("/health", None, ""),
        ("/v1/models", {"prompt": "x"}, ""),
        ("/v1/completions", {"prompt": 5}, ""),
        ("/v1/completions", [1], ""),
    ],
)
def test_routing_text_is_the_start_of_the_prompt(path, body, text):
    assert routing_text(path, b"" if body is None else json.dumps(body).encode()) == text


def test_routing_text_of_a_bad_body_is_empty_and_long_prompts_are_cut():
    assert routing_text("/v1/completions", b"{not json") == ""
    assert routing_text("/v1/completions", b"\xff\xfe") == ""
    assert routing_text("/v1/completions", json.dumps({"prompt": "a" * 100}).encode(), max_chars=10) == "a" * 10


# ---------------------------------------------------------------------------------------------------------
# The Ray RequestRouter subclass, with stand-in replicas (no cluster)


class FakeReplica:
    """What Ray's routers read of a RunningReplica."""

    def __init__(self, deployment_id, name: str, queue_len: int = 0, max_ongoing_requests: int = 8):
        from ray.serve._private.common import ReplicaID

        self.replica_id = ReplicaID(name, deployment_id)
        self.queue_len = queue_len
        self.max_ongoing_requests = max_ongoing_requests

    async def get_queue_len(self, *, deadline_s: float) -> int:
        return self.queue_len


def _router_and_replicas(n: int = 3, **kwargs):
    from ray.serve._private.common import DeploymentHandleSource, DeploymentID
    from ray.serve.config import RequestRouterConfig

    from codegen_deploy.serve.routing import PrefixAffinityRouter

    # The class as a handle gets it (pickled with its module by value; in this process, the same class).
    router_class = RequestRouterConfig(request_router_class=PrefixAffinityRouter).get_request_router_class()
    deployment = DeploymentID(name="codegen", app_name="codegen")
    router = router_class(
        deployment_id=deployment, handle_source=DeploymentHandleSource.REPLICA, use_replica_queue_len_cache=True
    )
    router.initialize_state(**kwargs)
    replicas = [FakeReplica(deployment, f"r{i}") for i in range(n)]
    router.update_replicas(replicas)
    return router, replicas


def _pending(text: str):
    from ray.serve._private.common import RequestMetadata
    from ray.serve.request_router import PendingRequest

    # In a handle's process the router's module is a by-value copy (Ray pickles it so), its RoutedRequest another
    # class than the one the ingress sends: a look-alike of another class stands for it.
    request = SimpleNamespace(**dataclasses.asdict(RoutedRequest({"type": "http"}, b"", text)))
    return PendingRequest(args=[request], kwargs={}, metadata=RequestMetadata("id", "internal-id"))


def test_ray_router_sends_a_files_next_keystroke_to_the_replica_that_took_its_first():
    pytest.importorskip("ray")

    async def run():
        router, replicas = _router_and_replicas(block_chars=16)
        text = editor_file(3)
        first = await router.choose_replicas(replicas, _pending(text))
        assert len(first) == 1 and len(first[0]) == 3  # no record yet: every replica, by load
        home = first[0][0]
        router.on_request_routed(_pending(text), home.replica_id, None)
        pending = _pending(text + "x = 1")
        ranks = await router.choose_replicas(replicas, pending)
        assert [r.replica_id for r in ranks[0]] == [home.replica_id]
        assert pending.routing_context.should_backoff  # retries back off when every replica is full
        # The affine replica gets hot (Ray's cached queue length): the request goes by load.
        router.replica_queue_len_cache.update(home.replica_id, 5)
        ranks = await router.choose_replicas(replicas, _pending(text + "x = 12"))
        assert len(ranks) == 1 and ranks[0][-1] is home
        return router, home, replicas

    router, home, _ = asyncio.run(run())
    assert router._records.size(home.replica_id) > 0


def test_ray_router_spreads_requests_without_a_match_over_equally_loaded_replicas():
    pytest.importorskip("ray")

    async def run():
        router, replicas = _router_and_replicas()
        # Ray takes the first of the least loaded in a rank: with equal loads, the first in the plan's order.
        return {(await router.choose_replicas(replicas, _pending("")))[0][0] for _ in range(40)}, replicas

    firsts, replicas = asyncio.run(run())
    assert firsts == set(replicas)


def test_ray_router_drops_the_records_of_replicas_that_go_away():
    pytest.importorskip("ray")

    async def run():
        router, replicas = _router_and_replicas(block_chars=16)
        for r in replicas:
            router.on_request_routed(_pending(editor_file(1)), r.replica_id, None)
        router.update_replicas(replicas[:2])  # scaled down
        router.on_replica_actor_died(replicas[1].replica_id)
        return router, replicas

    router, replicas = asyncio.run(run())
    assert router._records.replicas() == [replicas[0].replica_id]
