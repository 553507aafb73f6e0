"""Prefix-affinity routing for codegen-serve --ray: each request goes to the replica most likely to hold its
prompt's prefix in its prefix cache, unless that replica is busier than the least loaded one by more than a
threshold.

Editors re-send the whole file on every keystroke; a replica that served the file's previous keystroke computes
only the new tail. Ray Serve's default router (power of two choices) sends the next keystroke to a random pair of
replicas, so most of it lands where nothing of the file is cached.

Ray's HTTP proxy hands an ingress replica only the ASGI scope, the body comes later through the replica's own
`receive` (ray/serve/_private/proxy_request_response.py, serialized_replica_arg), so a router in front of the
replicas serving HTTP never sees a prompt. serve/ray.py therefore runs a small ingress deployment that reads the
body and calls the model replicas through a DeploymentHandle with a RoutedRequest: the body, and the text its
prompt starts with (routing_text). That handle's router is PrefixAffinityRouter.

The decision is plain data a test can drive without Ray: prompt_blocks() cuts the text into hashed blocks (each
hash covers the whole prefix up to its block's end), PrefixRecords keeps a bounded record of the blocks each
replica was sent, and plan_route() turns matches and loads into the ranks of replicas Ray tries in order.
"""

from __future__ import annotations

import json
import random
from collections import OrderedDict
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

try:
    from ray.serve.request_router import RequestRouter
except ImportError:  # Ray is optional ("codegen-deploy[ray]"): without it only the planning is used (tests)
    RequestRouter = object  # type: ignore[assignment,misc]

R = TypeVar("R", bound=Hashable)  # a replica: Ray's ReplicaID, or any name in tests


@dataclass(frozen=True)
class RoutingConfig:
    """How PrefixAffinityRouter decides (Ray passes these as request_router_kwargs).

    block_chars: the prefix is matched in blocks of this many characters (a shorter tail is not matched).
    max_chars: only the prompt's first max_chars characters count (bounds the work per request).
    max_blocks_per_replica: the blocks remembered for each replica, least recently sent dropped first.
    imbalance_threshold: affinity holds while the affine replica has at most this many more ongoing requests
        than the least loaded one; past it the request goes by load.
    min_match_fraction: a match shorter than this fraction of the prompt's blocks is no match (a shared licence
        header should not pull every file to one replica).
    """

    block_chars: int = 64
    max_chars: int = 16384
    max_blocks_per_replica: int = 4096
    imbalance_threshold: int = 4
    min_match_fraction: float = 0.1

    def __post_init__(self):
        if self.block_chars < 1 or self.max_chars < 1 or self.max_blocks_per_replica < 1:
            raise ValueError(f"block_chars, max_chars and max_blocks_per_replica must be positive: {self}")
        if self.imbalance_threshold < 0 or not 0.0 <= self.min_match_fraction <= 1.0:
            raise ValueError(f"imbalance_threshold must be >= 0 and min_match_fraction in [0, 1]: {self}")


@dataclass(frozen=True)
class RoutedRequest:
    """An HTTP request as the ingress hands it to a model replica: its ASGI scope and whole body, and the text
    its prompt starts with (what the router matches; "" for requests without a prompt)."""

    scope: dict[str, Any]
    body: bytes
    routing_text: str = ""


@dataclass(frozen=True)
class RoutePlan(Generic[R]):
    """Where a request goes: Ray tries the replicas of ranks[0] (the least loaded of them that has room), then
    ranks[1], ... `reason` says why ("affinity", "imbalanced", "no match"); `affine` is the replica holding the
    longest prefix, when there is one."""

    ranks: tuple[tuple[R, ...], ...]
    reason: str
    affine: R | None = None


# ---------------------------------------------------------------------------------------------------------
# The text a request's prompt starts with


def routing_text(path: str, body: bytes, max_chars: int = RoutingConfig.max_chars) -> str:
    """The start of the prompt a request to `path` with this JSON body gives the model, at most max_chars long;
    "" when it has none or the body is not valid (the app answers that request with its own error).

    Only its prefix must behave like the prompt's: the same file sent again starts with the same text."""
    kind = _prompt_kind(path)
    if kind is None or not body:
        return ""
    try:
        request = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return ""
    if not isinstance(request, dict):
        return ""
    if kind == "completions":
        text = _completion_text(request.get("prompt"))
    elif kind == "chat":
        text = _chat_text(request.get("messages"))
    else:
        text = _infill_text(request)
    return text[:max_chars]


def _prompt_kind(path: str) -> str | None:
    if path == "/v1/completions":
        return "completions"
    parts = path.split("/")  # "", "v1", "engines", ENGINE, "completions": FauxPilot's engine path
    if len(parts) == 5 and parts[1:3] == ["v1", "engines"] and parts[4] == "completions":
        return "completions"
    if path == "/v1/chat/completions":
        return "chat"
    if path == "/infill":
        return "infill"
    return None


def _completion_text(prompt: Any) -> str:
    # A list of prompts routes by its first; token ids become "id," each, so that a prefix of ids is a prefix of
    # the text and [1, 2] never matches the start of [1, 23].
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
        return "".join(f"{t}," for t in prompt)
    return ""


def _chat_text(messages: Any) -> str:
    # The chat template lays the messages out in order: a conversation that grows keeps its start.
    if not isinstance(messages, list):
        return ""
    out = []
    for m in messages:
        if not isinstance(m, dict):
            continue
        content = m.get("content")
        if isinstance(content, list):  # content parts: their text
            content = "".join(
                p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
            )
        out.append(f"{m.get('role', '')}\n{content if isinstance(content, str) else ''}\n")
    return "".join(out)


def _infill_text(request: dict) -> str:
    # The prompt infill.py builds starts with the other files (input_extra), then the text before the cursor's
    # line (input_prefix). The file comes first here: the other files are a ring of recently seen code that
    # rotates (llama.vim, llama.vscode), while the file is what stays the editor's own from keystroke to keystroke.
    extra = request.get("input_extra")
    files = extra if isinstance(extra, list) else []
    context = "".join(f"--- {f.get('filename', '')} ---\n{f.get('text', '')}\n" for f in files if isinstance(f, dict))
    prefix = request.get("input_prefix")
    return (prefix if isinstance(prefix, str) else "") + context


def prompt_blocks(text: str, config: RoutingConfig = RoutingConfig()) -> list[int]:
    """The hashes of the text's whole blocks of config.block_chars characters (within config.max_chars): block
    i's hash covers the text up to its end, so two texts share their first k hashes exactly when (but for hash
    collisions) they share their first k blocks."""
    text = text[: config.max_chars]
    size = config.block_chars
    hashes, h = [], 0
    for start in range(0, len(text) - size + 1, size):
        h = hash((h, text[start : start + size]))
        hashes.append(h)
    return hashes


# ---------------------------------------------------------------------------------------------------------
# What each replica was sent


@dataclass
class PrefixRecords(Generic[R]):
    """The prompt blocks each replica was sent, at most `max_blocks` per replica, least recently sent dropped
    first. An approximation of each replica's prefix cache: it never asks the replicas."""

    max_blocks: int = RoutingConfig.max_blocks_per_replica
    _blocks: dict[R, OrderedDict[int, None]] = field(default_factory=dict, init=False, repr=False)

    def record(self, replica: R, blocks: Sequence[int]) -> None:
        """Note that `replica` was sent a prompt with these blocks."""
        if not blocks:
            return
        seen = self._blocks.setdefault(replica, OrderedDict())
        # Last block first, so a prompt's first block is its most recent: the cap drops the ends of prompts
        # before their starts, and what is kept of a prompt is always a prefix of it (matched() relies on it).
        for h in reversed(blocks):
            seen[h] = None
            seen.move_to_end(h)
        while len(seen) > self.max_blocks:
            seen.popitem(last=False)

    def matched(self, replica: R, blocks: Sequence[int]) -> int:
        """How many of the prompt's first blocks the replica was sent."""
        seen = self._blocks.get(replica)
        if not seen:
            return 0
        n = 0
        for h in blocks:
            if h not in seen:
                break
            n += 1
        return n

    def forget(self, replica: R) -> None:
        """Drop the record of a replica that is gone."""
        self._blocks.pop(replica, None)

    def keep_only(self, replicas: Iterable[R]) -> None:
        """Drop the records of every replica but these (the running ones)."""
        keep = set(replicas)
        for r in [r for r in self._blocks if r not in keep]:
            del self._blocks[r]

    def size(self, replica: R) -> int:
        """The number of blocks recorded for a replica."""
        return len(self._blocks.get(replica, ()))

    def replicas(self) -> list[R]:
        """The replicas with a record."""
        return list(self._blocks)


def plan_route(loads: Mapping[R, int], matched: Mapping[R, int], n_blocks: int, config: RoutingConfig) -> RoutePlan[R]:
    """Where a prompt of `n_blocks` blocks goes, given each candidate replica's ongoing requests (`loads`, whose
    order breaks ties: shuffle it) and how many of the prompt's first blocks each was sent (`matched`).

    The replica with the longest match (the least loaded of those, on a tie) comes first, and the others by load
    after it, unless the match is too short (min_match_fraction) or that replica has more than
    imbalance_threshold requests more than the least loaded one: then all go by load, so affinity never makes a
    hot replica hotter. Like Ray's PrefixCacheAffinityRouter, which compares its busiest and least busy replica;
    here the affine one is compared, so one busy replica elsewhere does not turn affinity off for all."""
    by_load = tuple(sorted(loads, key=loads.__getitem__))  # stable: equal loads keep the given order
    if not by_load:
        return RoutePlan((), "no replicas")
    best = max(matched.get(r, 0) for r in by_load)
    if best == 0 or best < config.min_match_fraction * n_blocks:
        return RoutePlan((by_load,), "no match")
    affine = next(r for r in by_load if matched.get(r, 0) == best)  # the least loaded of the longest matches
    if loads[affine] - loads[by_load[0]] > config.imbalance_threshold:
        return RoutePlan((by_load,), "imbalanced", affine)
    rest = tuple(r for r in by_load if r != affine)
    return RoutePlan(((affine,), rest) if rest else ((affine,),), "affinity", affine)


# ---------------------------------------------------------------------------------------------------------
# The Ray Serve request router


class PrefixAffinityRouter(RequestRouter):
    """Ray Serve's RequestRouter for the model deployment of codegen-serve --ray (request_router_config):
    plan_route() over PrefixRecords of what each replica was sent, with Ray's queue lengths as loads.

    Not FIFOMixin: with it, a replica found for one request is handed to the oldest waiting one instead, which
    would send a file's keystroke to the replica chosen for another file. The records live in the process of
    the handle (the ingress replica), so one ingress replica sees every request."""

    def initialize_state(self, **kwargs):
        """Called by Ray with request_router_kwargs: RoutingConfig's fields."""
        self._routing = RoutingConfig(**kwargs)
        self._records: PrefixRecords = PrefixRecords(self._routing.max_blocks_per_replica)

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        """One try at routing: the ranks of plan_route(), as lists of Ray's RunningReplica."""
        if not candidate_replicas:
            return []
        if pending_request is not None:
            # Back off between tries when every replica is full (Ray's mixins set it; without, it retries at once).
            pending_request.routing_context.should_backoff = True
        blocks = prompt_blocks(request_text(pending_request), self._routing)
        replicas = random.sample(candidate_replicas, len(candidate_replicas))  # ties go to a random replica
        loads = await self._loads(replicas)
        matched = {r.replica_id: self._records.matched(r.replica_id, blocks) for r in replicas}
        plan = plan_route(loads, matched, len(blocks), self._routing)
        by_id = {r.replica_id: r for r in replicas}
        return [[by_id[i] for i in rank] for rank in plan.ranks]

    def on_request_routed(self, pending_request, replica_id, result) -> None:
        """A replica took the request: record its prompt's blocks there."""
        self._records.record(replica_id, prompt_blocks(request_text(pending_request), self._routing))

    def update_replicas(self, replicas) -> None:
        """The running replicas changed (autoscaling, restarts): drop the records of those gone."""
        super().update_replicas(replicas)
        self._records.keep_only(self._replica_id_set)

    def on_replica_actor_died(self, replica_id) -> None:
        """A replica died: drop it and its record."""
        super().on_replica_actor_died(replica_id)
        self._records.forget(replica_id)

    async def _loads(self, replicas) -> dict:
        """Each replica's ongoing requests: Ray's cached queue lengths, probing those not cached (as Ray's own
        routers do). A replica that does not answer counts as full (it goes last, and is never "least loaded")."""
        loads = {}
        for r in replicas:
            n = self._replica_queue_len_cache.get(r.replica_id) if self._use_replica_queue_len_cache else None
            if n is not None:
                loads[r.replica_id] = n
        unknown = [r for r in replicas if r.replica_id not in loads]
        if unknown:
            for r, n in await self._probe_queue_lens(unknown, 0):
                loads[r.replica_id] = r.max_ongoing_requests if n is None else n
        return {r.replica_id: loads[r.replica_id] for r in replicas}  # in the given order: it breaks ties


def request_text(pending_request) -> str:
    """The routing text of a Ray PendingRequest: that of its RoutedRequest argument, "" without one.

    By attribute, not isinstance: Ray pickles the router's module by value (ray/serve/config.py,
    _serialize_request_router_cls), so the router's RoutedRequest is a copy of the class the ingress sends."""
    if pending_request is None:
        return ""
    for arg in pending_request.args:
        text = getattr(arg, "routing_text", None)
        if isinstance(text, str):
            return text
    return ""
