"""The ``consortium`` command.

Subcommands::

    consortium demo                     five synthetic banks, end to end
    consortium simulate                 N institutions in Flower's simulation engine
    consortium data generate | split    prepare institution data directories
    consortium certs DIR                a local CA and server certificate for a trial
    consortium coordinator              the coordinator (Flower SuperLink + ServerApp)
    consortium node                     one institution (Flower SuperNode + ClientApp)
    consortium runs list | show         what the run store holds
    consortium dashboard                the live dashboard (federation, privacy, models, fleet, alerts)
    consortium registry ...             signed model bundles and the model registry
    consortium edge vision ...          count vehicles on an edge device, send only counts
    consortium enroll INSTITUTION       an institution's node key pair (what the operator registers)

Every error that bad input can cause is printed as one line naming the problem
(no traceback) and the command exits with status 2.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any

import click

from consortium import __version__
from consortium.edge.vision.commands import vision
from consortium.errors import ConsortiumError
from consortium.federation.config import STRATEGIES, FederationConfig, parse_int_list
from consortium.privacy.commands import dp_options
from consortium.privacy.commands import privacy as privacy_group
from consortium.registry.commands import check_publish_options, publish_after_run, publish_options
from consortium.registry.commands import registry as registry_group

DEFAULTS = FederationConfig()
"""Command-line defaults are the library's defaults."""

logger = logging.getLogger("consortium")


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Flower and Ray are chatty; keep them quiet unless asked.
    # Flower resets its own logger's level during a simulation, so detach it from our
    # handlers instead of only raising its level.
    for name in ("flwr", "ray"):
        lib = logging.getLogger(name)
        lib.setLevel(logging.DEBUG if verbose >= 2 else logging.ERROR)
        lib.propagate = verbose >= 2
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")


def _friendly_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ConsortiumError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="consortium")
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug incl. Flower/Ray).")
@click.pass_context
def main(ctx: click.Context, verbose: int) -> None:
    """Federated fraud and anomaly detection: institutions train one model together
    without showing their data to anyone."""
    ctx.ensure_object(dict)
    ctx.obj["verbose"] = verbose
    _setup_logging(verbose)


# --------------------------------------------------------------------------- demo


@main.command()
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="demo-output", show_default=True,
              help="Directory for the plot, JSON result, run store and institution data.")
@click.option("--institutions", type=click.IntRange(2, 50), default=5, show_default=True)
@click.option("--transactions", type=click.IntRange(1000), default=20_000, show_default=True,
              help="Transactions generated per institution.")
@click.option("--rounds", type=click.IntRange(1), default=10, show_default=True)
@click.option("--model", type=click.Choice(["mlp", "autoencoder", "gbdt"]), default="mlp", show_default=True,
              help="gbdt: federated gradient-boosted trees (--trees; --rounds does not apply).")
@click.option("--trees", type=click.IntRange(1), default=200, show_default=True, help="gbdt: maximum trees.")
@click.option("--strategy", type=click.Choice(STRATEGIES), default=DEFAULTS.strategy, show_default=True)
@click.option("--secure-aggregation/--no-secure-aggregation", default=True, show_default=True,
              help="Sum updates with secure aggregation (the coordinator sees only sums).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--store", "store_url", default=None, help="Run store URL (default: SQLite file in --out).")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON instead of a table.")
@click.option("--broker", "broker_url", default=None,
              help="MQTT broker for the edge agent and the dashboard (mqtt://HOST:PORT; default: in-process).")
@click.option("--dashboard/--no-dashboard", "with_dashboard", default=True, show_default=True,
              help="Serve the live dashboard (127.0.0.1:8050 or a free port) while the demo runs.")
@click.option("--keep-dashboard", is_flag=True, help="Keep the dashboard up after the demo until Ctrl-C.")
@_friendly_errors
def demo(out_dir: str, institutions: int, transactions: int, rounds: int, model: str, trees: int, strategy: str,
         secure_aggregation: bool, seed: int, store_url: str | None, as_json: bool, broker_url: str | None,
         with_dashboard: bool, keep_dashboard: bool) -> None:
    """Five synthetic banks train one fraud model together, end to end.

    Generates the institutions, trains federated in Flower's simulation engine,
    trains local-only and centralized baselines on the same split, prints AUPRC /
    ROC-AUC / recall@1%FPR for each and writes a PNG of AUPRC per round.
    """
    if model == "gbdt":
        from consortium.federation.gbdt_cli import gbdt_demo_command  # noqa: PLC0415

        gbdt_demo_command(out_dir=out_dir, institutions=institutions, transactions=transactions, trees=trees,
                          secure_aggregation=secure_aggregation, seed=seed, store_url=store_url, as_json=as_json)
        return
    from consortium.dashboard.server import start_demo_dashboard  # noqa: PLC0415
    from consortium.demo import run_demo  # noqa: PLC0415
    from consortium.federation.progress import RoundProgress  # noqa: PLC0415

    with contextlib.ExitStack() as stack:
        embedded = broker_url is None
        if broker_url is None:
            # One in-process broker for the whole demo: the edge agent publishes to it and the dashboard
            # subscribes to it, so the demo's alerts appear live on the page.
            from consortium.edge.broker import EmbeddedBroker  # noqa: PLC0415

            broker_url = stack.enter_context(EmbeddedBroker()).url
        board = start_demo_dashboard(out_dir, store_url=store_url, broker_url=broker_url) if with_dashboard else None
        if board is not None:
            stack.callback(board.stop)
            click.echo(f"Dashboard:       {board.url}", err=as_json)
        with RoundProgress(total=rounds, enabled=not as_json) as progress:
            out = run_demo(
                out_dir=out_dir, institutions=institutions, transactions=transactions, rounds=rounds,
                model=model, strategy=strategy, secure_aggregation=secure_aggregation, seed=seed,
                store_url=store_url, on_round=progress.update, on_stage=progress.stage, broker_url=broker_url,
                embedded_broker=embedded,
            )
        dashboard = None
        if board is not None:
            sent = int(out.edge["alerts"]) if out.edge is not None else 0
            # Stop the dashboard only once it has every alert the agent delivered (they are on the page).
            dashboard = {"url": board.url, "alerts_stored": board.wait_for_alerts(sent), "alerts_sent": sent}
        _demo_report(out, as_json=as_json, dashboard=dashboard)
        if board is not None and keep_dashboard:
            click.echo(f"Dashboard still at {board.url}; Ctrl-C to stop.", err=as_json)
            with contextlib.suppress(KeyboardInterrupt):
                board.wait()


def _demo_report(out: Any, *, as_json: bool, dashboard: dict[str, Any] | None = None) -> None:
    if as_json:
        payload = json.loads(out.json_path.read_text())
        if dashboard is not None:
            payload["dashboard"] = dashboard
        click.echo(json.dumps(payload, indent=2))
        return
    from consortium.federation.progress import print_results_table  # noqa: PLC0415

    print_results_table(out.result)
    click.echo(f"AUPRC per round: {out.plot}")
    click.echo(f"Full results:    {out.json_path}")
    click.echo(f"Run store:       {out.store_url}  (run {out.result.run.run_id})")
    click.echo(f"Model bundle:    {out.bundle}")
    if out.edge is not None:
        e = out.edge
        click.echo(f"Edge agent:      scored {e['scored']:,} holdout transactions, {e['alerts']:,} alerts "
                   f"({e['alerts_received']:,} received over MQTT{', embedded broker' if e['embedded_broker'] else ''}"
                   f"), {e['frauds_alerted']}/{e['frauds_in_stream']} frauds alerted, "
                   f"p50 {e['latency_p50_us']:.0f} µs per transaction")
    if dashboard is not None:
        click.echo(f"Dashboard:       {dashboard['url']}  ({dashboard['alerts_stored']:,} of "
                   f"{dashboard['alerts_sent']:,} edge alerts arrived live)")
    click.echo(f"Finished in {out.seconds:.0f} s")


# --------------------------------------------------------------------------- simulate


@main.command()
@click.option("--data", "data_path", default="synthetic", show_default=True,
              help="'synthetic', an .npz file with arrays X and y, or a .csv file (see --label-column).")
@click.option("--label-column", default="label", show_default=True, help="Label column of a CSV file.")
@click.option("--institutions", type=click.IntRange(1, 200), default=5, show_default=True)
@click.option("--partition", type=click.Choice(["iid", "dirichlet", "quantity"]), default="dirichlet",
              show_default=True, help="How rows of one dataset are split across institutions.")
@click.option("--alpha", type=float, default=0.5, show_default=True, help="Dirichlet concentration.")
@click.option("--transactions", type=click.IntRange(1000), default=20_000, show_default=True,
              help="Synthetic data: transactions per institution.")
@click.option("--rounds", type=click.IntRange(1), default=10, show_default=True)
@click.option("--local-epochs", type=click.IntRange(1), default=DEFAULTS.local_epochs, show_default=True,
              help="Epochs each institution trains per round.")
@click.option("--lr", type=float, default=DEFAULTS.lr, show_default=True, help="Local learning rate (Adam).")
@click.option("--batch-size", type=click.IntRange(1), default=DEFAULTS.batch_size, show_default=True)
@click.option("--model", type=click.Choice(["mlp", "autoencoder", "gbdt"]), default="mlp", show_default=True,
              help="gbdt: federated gradient-boosted trees (--trees, --dp-epsilon; MLP options do not apply).")
@click.option("--hidden", default=",".join(str(h) for h in DEFAULTS.hidden), show_default=True,
              help="Hidden layer widths, comma-separated; \"\" = logistic regression (best under DP).")
@click.option("--trees", type=click.IntRange(1), default=200, show_default=True, help="gbdt: maximum trees.")
@click.option("--dp-epsilon", type=float, default=None, help="gbdt: DP on the histograms at this epsilon.")
@click.option("--strategy", type=click.Choice(STRATEGIES), default=DEFAULTS.strategy, show_default=True)
@click.option("--loss", type=click.Choice(["weighted_bce", "focal", "bce"]), default="weighted_bce", show_default=True)
@click.option("--secure-aggregation/--no-secure-aggregation", default=True, show_default=True)
@click.option("--baselines/--no-baselines", default=True, show_default=True,
              help="Also train local-only and centralized baselines on the same split.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--store", "store_url", default="sqlite:///consortium.db", show_default=True,
              help="Run store URL (SQLite file or postgresql+psycopg://user@host/db).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Keep institution data and results here (default: a temporary directory).")
@click.option("--json", "as_json", is_flag=True, help="Print results as JSON.")
@publish_options
@_friendly_errors
@dp_options
def simulate(data_path: str, label_column: str, institutions: int, partition: str, alpha: float,
             transactions: int, rounds: int, local_epochs: int, lr: float, batch_size: int, model: str,
             hidden: str, trees: int, dp_epsilon: float | None, strategy: str, loss: str, secure_aggregation: bool,
             baselines: bool, seed: int, store_url: str, out_dir: str | None, as_json: bool,
             dp_settings: dict[str, Any], **publish: Any) -> None:
    """Run N institutions in Flower's simulation engine on one machine."""
    check_publish_options(publish)
    from consortium.federation.config import FederationConfig  # noqa: PLC0415
    from consortium.federation.experiment import dump_json, run_experiment  # noqa: PLC0415
    from consortium.federation.progress import RoundProgress, print_results_table  # noqa: PLC0415
    from consortium.registry import RunStore  # noqa: PLC0415

    split, name = _load_split(data_path, label_column=label_column, institutions=institutions,
                              partition=partition, alpha=alpha, transactions=transactions, seed=seed)
    if model == "gbdt":
        from consortium.federation.gbdt_cli import gbdt_simulate_command  # noqa: PLC0415

        gbdt_simulate_command(split, name=name, trees=trees, dp_epsilon=dp_epsilon,
                              secure_aggregation=secure_aggregation, baselines=baselines, seed=seed,
                              store_url=store_url, out_dir=out_dir, as_json=as_json)
        return
    config = FederationConfig(
        num_rounds=rounds, strategy=strategy, model=model, local_epochs=local_epochs, lr=lr,  # type: ignore[arg-type]
        hidden=_hidden_widths(hidden), batch_size=batch_size, loss=loss, min_nodes=len(split.institutions),
        secure_aggregation=secure_aggregation, store_url=store_url, run_name=f"simulate-{name}", seed=seed,
        **dp_settings,
    )
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(out_dir) if out_dir else Path(tmp)
        with RoundProgress(total=rounds, enabled=not as_json) as progress, RunStore(store_url) as store:
            result = run_experiment(split, config, work_dir=work, dataset_name=name, store=store,
                                    on_round=progress.update, baselines=baselines)
            publish_after_run(store, run_id=result.run.run_id, **publish)
        if out_dir:
            dump_json(result.to_json(), work / "results.json")
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2))
    else:
        print_results_table(result)
        click.echo(f"Run store: {store_url}  (run {result.run.run_id})")


def _hidden_widths(text: str) -> tuple[int, ...]:
    """``"64,32"`` -> (64, 32); ``""`` -> () (logistic regression); anything else is a usage error."""
    try:
        return parse_int_list(text)
    except ValueError:
        raise click.BadParameter(f"expected comma-separated ints such as 64,32 (or \"\"), got {text!r}",
                                 param_hint="--hidden") from None


def _load_split(data_path: str, *, label_column: str, institutions: int, partition: str, alpha: float,
                transactions: int, seed: int):  # type: ignore[no-untyped-def]
    from consortium.data import (  # noqa: PLC0415
        federate,
        federate_institutions,
        generate_federation,
        load_csv,
        load_npz,
    )

    if data_path == "synthetic":
        fed = generate_federation(institutions, transactions_per_institution=transactions, seed=seed)
        return federate_institutions({k: v.dataset for k, v in fed.items()}, seed=seed), "synthetic"
    path = Path(data_path)
    if path.suffix == ".csv":
        ds = load_csv(path, label_column=label_column)
    else:
        ds = load_npz(path)
    return federate(ds, institutions, scheme=partition, alpha=alpha, seed=seed), path.stem  # type: ignore[arg-type]


# --------------------------------------------------------------------------- data


@main.group()
def data() -> None:
    """Prepare institution data directories (train/val/test .npz per institution)."""


@data.command("generate")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), required=True)
@click.option("--institutions", type=click.IntRange(1, 50), default=5, show_default=True)
@click.option("--transactions", type=click.IntRange(1000), default=20_000, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@_friendly_errors
def data_generate(out_dir: str, institutions: int, transactions: int, seed: int) -> None:
    """Generate synthetic institutions and write one directory per institution plus holdout.npz."""
    from consortium.data import federate_institutions, generate_federation, save_split  # noqa: PLC0415

    fed = generate_federation(institutions, transactions_per_institution=transactions, seed=seed)
    split = federate_institutions({k: v.dataset for k, v in fed.items()}, seed=seed)
    path = save_split(split, out_dir)
    click.echo(f"Wrote {len(split.institutions)} institutions to {path}: {', '.join(split.names())}")


@data.command("split")
@click.argument("source", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", "out_dir", type=click.Path(file_okay=False), required=True)
@click.option("--label-column", default="label", show_default=True)
@click.option("--institutions", type=click.IntRange(1, 200), default=5, show_default=True)
@click.option("--partition", type=click.Choice(["iid", "dirichlet", "quantity"]), default="dirichlet",
              show_default=True, help="How rows are split across institutions.")
@click.option("--alpha", type=float, default=0.5, show_default=True, help="Dirichlet concentration.")
@click.option("--seed", type=int, default=0, show_default=True)
@_friendly_errors
def data_split(source: str, out_dir: str, label_column: str, institutions: int, partition: str,
               alpha: float, seed: int) -> None:
    """Split one .npz/.csv dataset into institution directories (simulating a consortium)."""
    from consortium.data import save_split  # noqa: PLC0415

    split, _ = _load_split(source, label_column=label_column, institutions=institutions, partition=partition,
                           alpha=alpha, transactions=0, seed=seed)
    path = save_split(split, out_dir)
    click.echo(f"Wrote {len(split.institutions)} institutions to {path}: {', '.join(split.names())}")


# --------------------------------------------------------------------------- deployment


@main.command()
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--host", "hosts", multiple=True, default=("127.0.0.1", "localhost"), show_default=True,
              help="Host name or IP the coordinator is reached at (repeatable).")
@click.option("--days", type=click.IntRange(1), default=365, show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace existing files.")
@_friendly_errors
def certs(directory: str, hosts: tuple[str, ...], days: int, overwrite: bool) -> None:
    """Make a CA and a coordinator certificate in DIRECTORY for a local trial."""
    from consortium.federation.certs import make_local_ca  # noqa: PLC0415

    paths = make_local_ca(directory, hosts=hosts, days=days, overwrite=overwrite)
    click.echo(f"CA certificate:      {paths.ca_cert}  (give this to every institution)")
    click.echo(f"Server certificate:  {paths.server_cert}")
    click.echo(f"Server key:          {paths.server_key}  (keep secret, mode 0600)")


@main.command()
@click.option("--certs", "certs_dir", type=click.Path(exists=True, file_okay=False), default=None,
              help="Directory made by 'consortium certs' (TLS on every link to the coordinator).")
@click.option("--insecure", is_flag=True, help="No TLS (plain text). For local experiments only.")
@click.option("--enrolled", "enrolled_dir", type=click.Path(exists=True, file_okay=False), default=None,
              help="Directory of <institution>.pub keys (made by 'consortium enroll'): only these may join.")
@click.option("--address", "fleet_address", default="127.0.0.1:9092", show_default=True,
              help="host:port the coordinator listens on (institutions' nodes and run submission).")
@click.option("--database", type=click.Path(dir_okay=False), default=None,
              help="SQLite file where Flower's SuperLink keeps its state (default: in memory).")
@click.option("--rounds", type=click.IntRange(1), default=10, show_default=True)
@click.option("--min-nodes", type=click.IntRange(1), default=2, show_default=True,
              help="Institutions that must be connected before training starts.")
@click.option("--strategy", type=click.Choice(STRATEGIES), default=DEFAULTS.strategy, show_default=True)
@click.option("--model", type=click.Choice(["mlp", "autoencoder"]), default="mlp", show_default=True)
@click.option("--hidden", default=",".join(str(h) for h in DEFAULTS.hidden), show_default=True,
              help="Hidden layer widths, comma-separated; \"\" = logistic regression (best under DP).")
@click.option("--secure-aggregation/--no-secure-aggregation", default=True, show_default=True)
@click.option("--holdout", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Optional held-out .npz the coordinator evaluates each round (trials only).")
@click.option("--store", "store_url", default="sqlite:///consortium.db", show_default=True)
@click.option("--work-dir", type=click.Path(file_okay=False), default="coordinator-state", show_default=True)
@click.option("--timeout", type=float, default=3600.0, show_default=True, help="Seconds to wait for the run.")
@click.option("--resume", default="", help="Continue an interrupted run after its last completed round: "
              "a run id, or 'latest' (newest unfinished deployed run).")
@publish_options
@_friendly_errors
@dp_options
def coordinator(certs_dir: str | None, insecure: bool, enrolled_dir: str | None, fleet_address: str,
                database: str | None, rounds: int,
                min_nodes: int, strategy: str, model: str, hidden: str,
                secure_aggregation: bool, holdout: str | None, store_url: str, work_dir: str,
                timeout: float, resume: str, dp_settings: dict[str, Any], **publish: Any) -> None:
    """Run the coordinator: Flower SuperLink plus one federated run of the consortium ServerApp.

    Institutions connect with 'consortium node --coordinator ADDRESS'. The run
    starts once --min-nodes institutions are connected; results go to --store.
    """
    check_publish_options(publish)
    from consortium.federation.config import FederationConfig  # noqa: PLC0415
    from consortium.federation.deploy import start_coordinator, submit_run  # noqa: PLC0415
    from consortium.federation.enroll import RefusalWatcher, load_enrolled_keys, register_nodes  # noqa: PLC0415

    cert_paths = _cert_paths(certs_dir, insecure)
    if not insecure and enrolled_dir is None:
        raise click.UsageError("Give --enrolled DIR (the institutions' public keys, made by 'consortium enroll'): "
                               "only enrolled institutions may join. --insecure turns TLS and this check off.")
    enrolled = load_enrolled_keys(enrolled_dir) if enrolled_dir is not None and not insecure else None
    store_abs = _absolute_sqlite(store_url)
    config = FederationConfig(
        num_rounds=rounds, strategy=strategy, model=model, min_nodes=min_nodes,  # type: ignore[arg-type]
        hidden=_hidden_widths(hidden), secure_aggregation=secure_aggregation, store_url=store_abs, run_name="deployed",
        holdout_path=str(Path(holdout).resolve()) if holdout else "", resume=resume,
        **dp_settings,
    )
    work = Path(work_dir).resolve()
    with start_coordinator(certs=cert_paths, insecure=insecure, fleet_address=fleet_address,
                           work_dir=work, database=database, node_auth=enrolled is not None) as coord:
        coord.wait_ready()
        if enrolled is not None:
            ids = register_nodes(coord, enrolled)
            click.echo(f"Enrolled institutions: {', '.join(f'{k} (node {v})' for k, v in ids.items())}")
        click.echo(f"Coordinator listening for institutions on {coord.addresses.fleet}"
                   f" ({'TLS' if cert_paths else 'INSECURE plain text'}); waiting for {min_nodes} node(s)")
        with RefusalWatcher(coord):
            outcome = submit_run(coord, run_config=config.to_run_config(), timeout=timeout)
    click.echo(f"Flower run {outcome.run_id}: {outcome.status}")
    if not outcome.succeeded:
        raise click.ClickException(f"The federated run did not complete: {outcome.status} {outcome.details}")
    if publish["bundle_key"] is not None:
        from consortium.registry import RunStore  # noqa: PLC0415

        with RunStore(store_abs) as store:  # the ServerApp recorded the run here: publish its newest completed run
            publish_after_run(store, run_id=None, **publish)


@main.command()
@click.option("--data", "data_path", type=click.Path(exists=True, file_okay=False), required=True,
              help="Institution directory with train.npz, val.npz and test.npz.")
@click.option("--institution", required=True, help="Name of this institution.")
@click.option("--coordinator", "fleet_address", default="127.0.0.1:9092", show_default=True,
              help="Coordinator's fleet address.")
@click.option("--ca-cert", type=click.Path(exists=True, dir_okay=False), default=None,
              help="CA certificate that signed the coordinator's certificate.")
@click.option("--insecure", is_flag=True, help="No TLS (plain text). For local experiments only.")
@click.option("--key", "key_path", type=click.Path(dir_okay=False), default=None,
              help="This institution's private key from 'consortium enroll' (mode 0600).")
@click.option("--disclose-eval/--no-disclose-eval", default=True, show_default=True,
              help="Share metrics on this institution's own test split with the coordinator.")
@click.option("--work-dir", type=click.Path(file_okay=False), default=None)
@_friendly_errors
def node(data_path: str, institution: str, fleet_address: str, ca_cert: str | None, insecure: bool,
         key_path: str | None, disclose_eval: bool, work_dir: str | None) -> None:
    """Run one institution's node: Flower SuperNode with the consortium ClientApp."""
    from consortium.federation.deploy import start_node  # noqa: PLC0415

    if not insecure and ca_cert is None:
        raise click.UsageError("Give --ca-cert (TLS) or --insecure (plain text, local experiments only).")
    if insecure:
        click.echo("WARNING: --insecure: this node's traffic is NOT encrypted and NOT authenticated.", err=True)
    elif key_path is None:
        raise click.UsageError("Give --key (this institution's private key, made by 'consortium enroll').")
    work = Path(work_dir or f"node-{institution}").resolve()
    proc = start_node(fleet_address=fleet_address, ca_cert=Path(ca_cert) if ca_cert else None,
                      insecure=insecure, data_path=Path(data_path).resolve(), institution=institution,
                      work_dir=work, extra_node_config={"disclose-eval": "true" if disclose_eval else "false"},
                      auth_key=key_path)
    # SIGTERM (systemd, kill, CI) must stop the SuperNode too, not orphan it.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        node_id = proc.wait_ready()
        click.echo(f"Node '{institution}' (id {node_id}) connected to {fleet_address}; Ctrl-C to stop "
                   f"(log: {proc.log_file})")
        while proc.is_running():
            time.sleep(1.0)
        raise click.ClickException(proc.exit_explanation())
    except KeyboardInterrupt:
        pass
    finally:
        proc.stop()


def _cert_paths(certs_dir: str | None, insecure: bool):  # type: ignore[no-untyped-def]
    from consortium.federation.certs import CertificatePaths  # noqa: PLC0415

    if insecure:
        click.echo("WARNING: --insecure: gRPC traffic between coordinator and institutions is NOT encrypted.",
                   err=True)
        return None
    if certs_dir is None:
        raise click.UsageError("Give --certs DIR (made by 'consortium certs DIR') or --insecure.")
    return CertificatePaths.in_directory(certs_dir)


def _absolute_sqlite(url: str) -> str:
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url.startswith(prefix + "/"):
        return prefix + str(Path(url[len(prefix):]).resolve())
    return url


# --------------------------------------------------------------------------- runs


@main.group()
def runs() -> None:
    """Inspect the run store."""


@runs.command("list")
@click.option("--store", "store_url", default="sqlite:///consortium.db", show_default=True)
@_friendly_errors
def runs_list(store_url: str) -> None:
    """List runs, newest first."""
    from consortium.registry import RunStore  # noqa: PLC0415

    with RunStore(store_url) as store:
        for r in store.list_runs():
            click.echo(f"{r.run_id}  {r.created_at:%Y-%m-%d %H:%M}  {r.status:<9}  {r.name}  "
                       f"({len(r.institutions)} institutions)")


@runs.command("show")
@click.argument("run_id")
@click.option("--store", "store_url", default="sqlite:///consortium.db", show_default=True)
@_friendly_errors
def runs_show(run_id: str, store_url: str) -> None:
    """Show a run's rounds and metrics."""
    from consortium.registry import RunStore  # noqa: PLC0415

    with RunStore(store_url) as store:
        run = store.get_run(run_id)
        click.echo(f"run {run.run_id} '{run.name}' {run.status}; institutions: {', '.join(run.institutions)}")
        for rr in store.rounds(run_id):
            g = rr.global_metrics
            click.echo(f"  round {rr.round:>3}: {len(rr.participants)} institutions, dropped {list(rr.dropped)}, "
                       f"AUPRC {g.get('auprc', float('nan')):.4f}, ROC-AUC {g.get('roc-auc', float('nan')):.4f}")
        for b in store.baselines(run_id):
            click.echo(f"  baseline {b.kind} {b.institution or ''}: AUPRC {b.metrics.get('auprc', float('nan')):.4f}")

main.add_command(privacy_group)


main.add_command(registry_group)

from consortium.dashboard.commands import dashboard as _dashboard_command  # noqa: E402
from consortium.edge.commands import edge  # noqa: E402
from consortium.federation.enroll_command import enroll  # noqa: E402

edge.add_command(vision)  # issue 9: `consortium edge vision ...`
main.add_command(_dashboard_command)
main.add_command(edge)
main.add_command(enroll)

if __name__ == "__main__":  # pragma: no cover
    main()
