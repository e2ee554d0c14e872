"""What replicas reserve: CPUs per replica (one rule for generation, SFT and the judge), and the
check at start that the cluster can hold every pass's reservations instead of waiting forever.
"""

from __future__ import annotations

from annotator.config import RunConfig
from annotator.core.errors import ResourceError

# CPUs of each pass 2a planning task, which runs beside the replicas.
PLANNING_TASK_CPUS = 0.25


def replica_cpus(cfg: RunConfig, cluster: dict, *, beside: float = PLANNING_TASK_CPUS) -> float:
    """CPUs per replica: the configured number, or with `auto` on a CPU run the cluster's CPUs left
    by the tasks that run beside the replicas (`beside`: pass 2a's planning tasks by default),
    shared by the replicas (1 per replica on GPUs). The one rule for every replica stage."""
    g = cfg.generation
    if g.num_cpus != "auto":
        return float(g.num_cpus)
    if g.num_gpus:
        return 1.0
    return max(0.5, (float(cluster.get("CPU", 1)) - beside) / g.concurrency)


def check_reservations(cfg: RunConfig, *, replica_cpus: float, cluster: dict, nodes: list[dict]) -> None:
    """Every pass's reservations against the cluster (unless it autoscales): a replica or task that
    fits no node, or replicas that together need more than the cluster has, stop the run here."""
    if cfg.ray.autoscaling:
        return
    g, c = cfg.generation, cfg.classifier
    have = {k: float(cluster.get(k, 0)) for k in ("CPU", "GPU")}
    largest = {k: max((float(n.get("Resources", {}).get(k, 0)) for n in nodes if n.get("Alive", True)), default=0.0) for k in ("CPU", "GPU")}
    problems = []
    if c.num_cpus > largest["CPU"]:
        problems.append(f"pass 1 tasks ask {c.num_cpus:g} CPUs each (classifier.num_cpus); the largest node has {largest['CPU']:g}")
    if g.enabled:
        plan = PLANNING_TASK_CPUS
        need = {"CPU": g.concurrency * replica_cpus + plan, "GPU": g.concurrency * g.num_gpus}
        for k, field in (("CPU", "num_cpus"), ("GPU", "num_gpus")):
            per = replica_cpus if k == "CPU" else g.num_gpus
            if per > largest[k]:
                problems.append(f"pass 2a (generate): one replica asks {per:g} {k}s (generation.{field}); the largest node has {largest[k]:g}")
            elif need[k] > have[k] + 1e-9:
                extra = f" + {plan:g} for the planning tasks" if k == "CPU" else ""
                problems.append(f"pass 2a (generate): {g.concurrency} replicas x {per:g} {k}s (generation.{field}){extra} = "
                                f"{need[k]:g} {k}s; the cluster has {have[k]:g}")
    if problems:
        raise ResourceError("the cluster cannot run this config: " + "; ".join(problems) +
                            ". Lower the reservation (generation.num_cpus: auto shares a CPU node's cores), generation.concurrency, "
                            "or add nodes (ray.autoscaling=true when the cluster adds them on demand).")
