"""``consortium enroll``: make an institution's node key pair and say what to send to whom."""

from __future__ import annotations

import click

from consortium.errors import ConsortiumError
from consortium.federation.enroll import generate_node_key, operator_instructions


@click.command("enroll")
@click.argument("institution")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="keys", show_default=True,
              help="Directory for <institution>.key (private, 0600) and <institution>.pub.")
@click.option("--overwrite", is_flag=True, help="Replace an existing key pair (the old key stops working "
              "once the operator enrols the new one).")
def enroll(institution: str, out_dir: str, overwrite: bool) -> None:
    """Make INSTITUTION's node key pair; print what the coordinator's operator must register."""
    try:
        key = generate_node_key(out_dir, institution, overwrite=overwrite)
    except ConsortiumError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(operator_instructions(key))
