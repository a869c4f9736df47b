"""The ``appliance record`` and ``appliance model fit|eval`` sub-commands."""

from __future__ import annotations

import argparse
import asyncio
import json

from appliance.errors import ConfigError

EXIT_OK = 0


def add_record_arguments(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("-c", "--config", required=True, metavar="FILE", help="TOML config file")
    sp.add_argument("--out", required=True, metavar="DIR", help="folder for <machine>.csv files")
    sp.add_argument(
        "--duration", type=float, default=60.0, metavar="S", help="seconds to record (60)"
    )
    sp.add_argument(
        "--scores",
        action="store_true",
        help="also score every window with the configured models, as `appliance run` does, "
        "into DIR/scores/<machine>.csv (model eval compares its scores with them)",
    )
    sp.set_defaults(func=cmd_record)


def cmd_record(args: argparse.Namespace) -> int:
    from appliance.config import load_config
    from appliance.modelkit.record import record

    if not args.duration > 0:
        raise ConfigError(f"--duration must be > 0, got {args.duration}")
    cfg = load_config(args.config)
    rec = asyncio.run(record(cfg, args.out, args.duration, scores=args.scores))
    print(f"recorded {rec.rows} rows of {len(cfg.devices)} device(s) into {args.out}")
    return EXIT_OK


FIT_HELP = """\
Fit a model on recordings of normal operation (CSV: a time column and one column per channel,
as `appliance record` writes or a historian exports; without a time column give --rate-hz).
Features per channel and 1 s window: mean, std, min, max. Writes a complete bundle (model.onnx,
manifest.json, golden.npz) whose score is 1.0 at the --quantile of the normal windows' scores;
serve it with engine.model or [[models]] model = "DIR". Refuses bad data (an empty file, a
channel missing from a file or constant in all, a long run of missing values, too few windows)
naming the file, line and column.

--context COLUMN (Gaussian only): condition the model on a column such as a program number or
a machining phase (numbers, or labels served as their index in the manifest's context.labels):
one Gaussian per value with enough windows, the global one for any other value. Served, the
context is a channel of the machine (its last sample in the window).
"""


def add_model_arguments(sp: argparse.ArgumentParser) -> None:
    sub = sp.add_subparsers(dest="model_command", metavar="SUBCOMMAND", required=True)
    fit = sub.add_parser(
        "fit",
        help="fit a model bundle on normal recordings",
        description=FIT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    fit.add_argument("--normal", nargs="+", required=True, metavar="PATH", help="CSV recordings")
    fit.add_argument("--out", required=True, metavar="DIR", help="bundle folder to write")
    fit.add_argument("--kind", choices=("gaussian", "autoencoder"), default="gaussian")
    fit.add_argument("--channels", nargs="+", metavar="NAME", help="channels to use (default all)")
    fit.add_argument("--rate-hz", type=float, metavar="HZ", help="sample rate of time-less CSVs")
    fit.add_argument("--window-s", type=float, default=1.0, metavar="S", help="window (1.0)")
    fit.add_argument(
        "--quantile", type=float, default=0.999, help="threshold quantile of normal scores"
    )
    fit.add_argument("--name", default="fitted", help="model name in the manifest")
    fit.add_argument(
        "--context", metavar="COLUMN", help="condition the model on this column (program, phase)"
    )
    fit.set_defaults(func=cmd_fit)

    ev = sub.add_parser(
        "eval",
        help="score normal and faulty recordings with a bundle",
        description="Score recordings with a bundle: per file the score distribution, alarms "
        "and detection delay at the bundle's threshold; overall ROC AUC (faulty windows as "
        "positives) and false alarms per 8-hour shift. A table on stdout; --json and --plot "
        "(PNG, needs matplotlib: the `plot` extra) write files.",
    )
    ev.add_argument("bundle", metavar="BUNDLE", help="model folder or shipped model name")
    ev.add_argument("--normal", nargs="*", default=[], metavar="PATH")
    ev.add_argument("--faulty", nargs="*", default=[], metavar="PATH")
    ev.add_argument("--rate-hz", type=float, metavar="HZ", help="sample rate of time-less CSVs")
    ev.add_argument("--json", metavar="PATH", help="write the report as JSON (key `auc`)")
    ev.add_argument("--plot", metavar="PATH", help="write a PNG of scores over time")
    ev.set_defaults(func=cmd_eval)

    kg = sub.add_parser(
        "keygen",
        help="make an Ed25519 key pair for signing model releases",
        description="Write model-signing.key (PEM, mode 0600: keep it off the appliance) and "
        "model-signing.pub into DIR (never overwrites) and print the line for "
        "downlink.model_keys. See docs/models.md, 'Releasing a model'.",
    )
    kg.add_argument("--out", required=True, metavar="DIR", help="folder for the key files")
    kg.set_defaults(func=cmd_keygen)

    sg = sub.add_parser(
        "sign",
        help="sign a model bundle for model.release",
        description="Write release.json (the release statement: name, version, sha256 of the "
        "bundle's canonical archive and of each file) and release.sig (its Ed25519 signature) "
        "into the bundle folder (or --out). Then send it: appliance cmd -c CONFIG model.release "
        "--bundle BUNDLE. See docs/models.md, 'Releasing a model'.",
    )
    sg.add_argument("bundle", metavar="BUNDLE", help="the bundle folder (manifest.json, ...)")
    sg.add_argument("--key", required=True, metavar="PRIVATE", help="the PEM private key file")
    sg.add_argument("--out", metavar="DIR", help="write release.json/.sig here instead")
    sg.set_defaults(func=cmd_sign)


def cmd_keygen(args: argparse.Namespace) -> int:
    from pathlib import Path

    from appliance.modelkit.release import generate_keys

    priv, pub, line = generate_keys(Path(args.out))
    print(f"wrote {priv} (private: keep it secret) and {pub}")
    print(f'add to the appliance config:\n[downlink]\nmodel_keys = ["{line}"]')
    return EXIT_OK


def cmd_sign(args: argparse.Namespace) -> int:
    from pathlib import Path

    from appliance.infer.bundle import load_bundle
    from appliance.modelkit.release import parse_statement, sign_bundle

    folder = Path(args.bundle)
    load_bundle(str(folder.resolve()))  # refuse to sign a bundle that would not load
    path = sign_bundle(folder, Path(args.key), Path(args.out) if args.out else None)
    st = parse_statement(path.read_bytes())
    print(
        f"signed {st.name} {st.version}: {path} and {path.with_name('release.sig')} "
        f"(bundle {st.bundle_bytes} bytes, sha256 {st.bundle_sha256})"
    )
    return EXIT_OK


def cmd_fit(args: argparse.Namespace) -> int:
    from appliance.modelkit.fit import fit_model

    res = fit_model(
        args.normal,
        args.out,
        kind=args.kind,
        channels=args.channels,
        rate_hz=args.rate_hz,
        window_s=args.window_s,
        quantile=args.quantile,
        name=args.name,
        context=args.context,
    )
    print(
        f"wrote {res.out}: {res.kind} model over {len(res.features)} features, fitted on "
        f"{res.windows} windows; score 1.0 = quantile {res.threshold_quantile} of normal"
    )
    if res.context_values:
        print(
            f"context {args.context}: own model for {len(res.context_values)} value(s), the "
            "global model for any other (manifest.json: context)"
        )
    return EXIT_OK


def cmd_eval(args: argparse.Namespace) -> int:
    from appliance.modelkit.evaluate import evaluate, format_table, plot

    if not args.normal and not args.faulty:
        raise ConfigError("give --normal and/or --faulty recordings")
    if args.plot:  # fail before the work when matplotlib is missing
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            from appliance.errors import ApplianceError

            raise ApplianceError(
                "--plot needs matplotlib: pip install 'cnc-edge-appliance[plot]'"
            ) from None
    from pathlib import Path

    bundle = args.bundle
    if "/" not in bundle and Path(bundle).is_dir():  # a folder here, not a shipped model name
        bundle = f"./{bundle}"
    report = evaluate(bundle, args.normal, args.faulty, args.rate_hz)
    print(format_table(report))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
    if args.plot:
        plot(report, args.plot)
    return EXIT_OK
