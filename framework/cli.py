"""The ``decodekit`` command line.

Built-in commands: ``plugins`` (every registered name with its kind and source) and
``generate`` (prompts through a model). Plugins add commands through ``register_commands``.
"""

from __future__ import annotations

import json
import sys

import click

from framework.errors import DecodekitError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="decodekit")
def cli() -> None:
    """decodekit: LLM text generation where every decoding technique is a plugin."""


@cli.command("plugins")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.option("--kind", default=None, help="only this kind (tokenizer, model, sampler, ...)")
def plugins_cmd(as_json: bool, kind: str | None) -> None:
    """List every registered name with its kind and the plugin that registered it."""
    from framework.plugins import get_plugin_manager

    regs = get_plugin_manager().all_registrations()
    if kind:
        regs = [r for r in regs if r.kind == kind]
    rows = [{"kind": r.kind, "name": r.name, "source": r.source} for r in regs]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    w_kind = max([4] + [len(r["kind"]) for r in rows])
    w_name = max([4] + [len(r["name"]) for r in rows])
    click.echo(f"{'KIND':<{w_kind}}  {'NAME':<{w_name}}  SOURCE")
    for r in rows:
        click.echo(f"{r['kind']:<{w_kind}}  {r['name']:<{w_name}}  {r['source']}")


@cli.command("generate")
@click.option("--model", "-m", required=True, help="local Hugging Face directory or registered model name")
@click.option("--max-tokens", default=64, show_default=True, type=int)
@click.option("--temperature", default=0.0, show_default=True, type=float, help="0 = greedy")
@click.option("--top-p", default=1.0, show_default=True, type=float)
@click.option("--top-k", default=0, show_default=True, type=int)
@click.option("--seed", default=None, type=int)
@click.option("--stop", multiple=True, help="stop string (repeatable)")
@click.option("--dtype", default="auto", show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--stream/--no-stream", default=None, help="stream a single prompt to the terminal")
@click.argument("prompts", nargs=-1, required=True)
def generate_cmd(model, max_tokens, temperature, top_p, top_k, seed, stop, dtype, device, stream, prompts) -> None:
    """Generate continuations of PROMPTS (batched together) and print them."""
    from framework import LLM, SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stop=list(stop))
    llm = LLM(model, dtype=dtype, device=device)
    if stream is None:
        stream = len(prompts) == 1 and sys.stdout.isatty()
    if stream:
        for prompt in prompts:
            click.echo(prompt, nl=False)
            for delta in llm.stream(prompt, params):
                click.echo(delta, nl=False)
            click.echo()
        return
    for out in llm.generate(list(prompts), params):
        c = out.outputs[0]
        click.echo(f"{out.prompt}{c.text}")
        m = out.metrics
        click.echo(
            f"  [{len(c.token_ids)} tokens, finish={c.finish_reason}, ttft={m.ttft * 1000:.1f} ms"
            + (f", {m.tpot * 1000:.1f} ms/token]" if m.tpot else "]"),
            err=True,
        )


def _add_plugin_commands() -> None:
    from framework.plugins import get_plugin_manager

    for reg in get_plugin_manager().registry("command"):
        if reg.name in cli.commands:
            raise DecodekitError(f"plugin {reg.source!r} registers command {reg.name!r}, which is built in")
        cli.add_command(reg.factory, reg.name)


def main(argv: list[str] | None = None) -> int:
    try:
        _add_plugin_commands()
        cli.main(args=argv, prog_name="decodekit", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except DecodekitError as exc:  # user errors: a message, never a traceback
        click.echo(f"error: {exc}", err=True)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
