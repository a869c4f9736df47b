"""``appliance status [-c FILE | --url URL]``: the status page's picture in the terminal.

Reads ``/api/v1/status`` of a running appliance: the URL given, or the ``[api]`` address of the
config file (``listen`` ``0.0.0.0``/``::`` is asked on the loopback address). Exit 0 when the
appliance is ready, 1 when it is not (the reasons are printed) or does not answer, 2 for a
config error or a config without the API enabled.
"""

from __future__ import annotations

import argparse
import json
import urllib.error
import urllib.request
from typing import Any

from appliance.errors import ConfigError

DEFAULT_CONFIG = "/etc/appliance/appliance.toml"


def add_arguments(sp: argparse.ArgumentParser) -> None:
    where = sp.add_mutually_exclusive_group()
    where.add_argument(
        "-c",
        "--config",
        metavar="FILE",
        help=f"the appliance's config file: its [api] address is asked (default {DEFAULT_CONFIG})",
    )
    where.add_argument("--url", metavar="URL", help="the API's base URL, e.g. http://10.0.0.5:8080")
    sp.add_argument("--json", action="store_true", help="print the raw /api/v1/status document")
    sp.add_argument(
        "--timeout", type=float, default=5.0, metavar="SECONDS", help="HTTP timeout (default 5)"
    )


def base_url(args: argparse.Namespace) -> str:
    if args.url:
        return str(args.url).rstrip("/")
    from appliance.config import load_config

    path = args.config or DEFAULT_CONFIG
    cfg = load_config(path)
    if not cfg.api.enabled:
        raise ConfigError(f"{path}: api.enabled is false: the appliance serves no status")
    host = cfg.api.listen
    if host in ("0.0.0.0", "", "::"):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{cfg.api.port}"


def fetch(url: str, timeout_s: float) -> dict[str, Any]:
    with urllib.request.urlopen(url + "/api/v1/status", timeout=timeout_s) as resp:
        data: dict[str, Any] = json.loads(resp.read())
    return data


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def render(st: dict[str, Any]) -> str:
    a = st["appliance"]
    lines = [
        f"{a['id']}  v{a['version']}  up {a['uptime_s']:.0f} s  "
        + ("READY" if st["ready"] else "NOT READY: " + "; ".join(st["reasons"]))
    ]
    e = st["engine"]
    if e["model"] is None:
        lines.append("engine   no model: nothing is scored")
    else:
        lines.append(
            f"engine   {e['model']['name']} {e['model']['version']} on {e['backend']}: "
            f"{e['calls']} batches, {e['rows']} rows, mean {_fmt(e['mean_ms'])} ms"
        )
    o, u = st["outbox"], st["uplink"]
    lines.append(
        f"uplink   {u['broker']} {'connected' if u['connected'] else 'DISCONNECTED'}, "
        f"{u['published']} published; outbox {o['pending']} pending "
        f"(oldest {_fmt(o['oldest_age_s'])} s), {o.get('evicted', 0)} evicted"
    )
    lines.append("")
    lines.append(f"{'device':<16} {'state':<11} {'score':>7} {'polls':>8} {'errors':>7}  values")
    for d in st["devices"]:
        values = ", ".join(
            f"{c}={_fmt(d['values'][c]['value'])}"
            + ("" if d["values"][c]["quality"] == "good" else f"({d['values'][c]['quality']})")
            for c in d["main_channels"]
            if c in d["values"]
        )
        lines.append(
            f"{d['name']:<16} {d['state']:<11} {_fmt(d['score']):>7} {d['polls']:>8} "
            f"{d['errors']:>7}  {values}"
        )
    al = st["alerts"]
    lines.append("")
    lines.append(
        f"alerts   {len(al['active'])} active ({al['raised']} raised, {al['cleared']} cleared)"
    )
    now = a["now"]
    for x in al["active"]:
        ack = ", acknowledged" if x["acknowledged"] else ""
        lines.append(
            f"  {x['severity']:<8} {x['rule']} on {x['machine']} "
            f"for {max(0.0, now - x['since']):.0f} s{ack}"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    url = base_url(args)
    try:
        st = fetch(url, args.timeout)
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        print(f"appliance status: no answer from {url}: {reason}")
        return 1
    print(json.dumps(st, indent=2) if args.json else render(st))
    return 0 if st["ready"] else 1
