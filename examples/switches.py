"""Kill switches and brownout levels in one short script, on the in-memory store.

Run it from the repository root:

    .venv/bin/python examples/switches.py

With ``RESKIT_STORE=redis://localhost:6379/0?namespace=scratch`` set, the same
code shares its switches and levels with every process configured alike (``pip
install "reskit[redis]"``); nothing else changes. It flips switches and levels
(and puts them back): point it at a scratch namespace, not at a fleet's.
"""

from __future__ import annotations

import reskit
from reskit import KillSwitch, Policy

reviews_switch = KillSwitch(
    "reviews",
    owner="team-reviews",
    description="product pages render without reviews",
)

# Shed reviews first (level 2), recommendations only when things are worse (level 4).
reviews = Policy("reviews", kill_switch=reviews_switch, shed_at=2, fallback=lambda exc: [])
recommendations = Policy("recommendations", shed_at=4, fallback=lambda exc: [])


@reviews
def product_reviews(product: str) -> list[str]:
    return [f"{product}: five stars"]


@recommendations
def recommended(product: str) -> list[str]:
    return [f"people who bought {product} also bought socks"]


def page(product: str) -> str:
    return f"reviews={product_reviews(product)} recommended={recommended(product)}"


def main() -> None:
    store = reskit.configure()  # RESKIT_STORE, else the memory store
    print("normal:      ", page("boots"))

    reskit.set_brownout_level(2, reason="black friday peak", actor="ops-oncall")
    print("brownout 2:  ", page("boots"))

    reskit.set_brownout_level(
        0, reason="vip tenant keeps everything", actor="ops-oncall", tenant="vip"
    )
    with reskit.bind_tenant("vip"):  # a request of tenant vip (middleware binds it per request)
        print("vip tenant:  ", page("boots"))
    reskit.set_brownout_level(None, reason="vip override done", actor="ops-oncall", tenant="vip")

    reskit.set_brownout_level(0, reason="peak is over", actor="ops-oncall")
    reskit.kill("reviews", reason="INC-88: reviews leak emails", actor="alice", ttl=3600)
    print("killed:      ", page("boots"), "| is_killed:", reskit.is_killed("reviews"))

    reskit.revive("reviews", reason="INC-88 fixed", actor="alice")
    print("revived:     ", page("boots"))

    for info in reskit.switches():
        print(f"switch {info.name!r}: owner {info.owner}, killed={info.killed}")
    for entry in store.audit():
        print(f"audit #{entry.seq} {entry.action} {entry.target} by {entry.actor}: {entry.reason}")
    print(store.verify_audit())
    store.close()


if __name__ == "__main__":
    main()
