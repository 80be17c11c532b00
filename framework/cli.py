"""The ``decodekit`` command line.

Built-in commands: ``run`` (a pipeline spec over prompts), ``serve`` (an OpenAI-compatible HTTP
server over a spec), ``validate`` (check a spec without loading models), ``schema`` (the spec's
JSON Schema), ``plugins`` (every registered name with its kind and source) and ``generate``
(prompts through a model, no spec). Plugins add commands
through ``register_commands``. User errors print ``error: ...`` and exit with status 2.
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
@click.option("--kind", default=None, help="only this kind: tokenizer, model, sampler, logits_processor (or processor), "
              "constraint, reranker, utility, drafter, command, route (plurals and dashes work too)")
def plugins_cmd(as_json: bool, kind: str | None) -> None:
    """List every registered name with its kind and the plugin that registered it."""
    from framework.plugins import KINDS, get_plugin_manager, normalize_kind

    regs = get_plugin_manager().all_registrations()
    if kind:
        norm = normalize_kind(kind)
        if norm is None:
            import difflib

            close = difflib.get_close_matches(kind, list(KINDS), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise click.BadParameter(f"unknown kind {kind!r}{hint} (kinds: {', '.join(KINDS)})", param_hint="--kind")
        regs = [r for r in regs if r.kind == norm]
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
@click.option("--skip-tokenizer-init", is_flag=True, help="load no tokenizer (a model directory without tokenizer files): "
              "each PROMPT is token ids separated by spaces or commas, and the output is token ids")
@click.argument("prompts", nargs=-1, required=True)
def generate_cmd(model, max_tokens, temperature, top_p, top_k, seed, stop, dtype, device, stream, skip_tokenizer_init,
                 prompts) -> None:
    """Generate continuations of PROMPTS (batched together) and print them."""
    from framework import LLM, SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stop=list(stop))
    if skip_tokenizer_init:
        try:
            id_prompts = [[int(t) for t in p.replace(",", " ").split()] for p in prompts]
        except ValueError:
            raise click.BadParameter("with --skip-tokenizer-init each prompt is token ids, e.g. '1 430 1011'",
                                     param_hint="PROMPTS") from None
        llm = LLM(model, dtype=dtype, device=device, skip_tokenizer_init=True)
        for out in llm.generate([{"prompt_token_ids": ids} for ids in id_prompts], params):
            click.echo(" ".join(map(str, out.prompt_token_ids)) + " -> " + " ".join(map(str, out.outputs[0].token_ids)))
        return
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


@cli.command("run")
@click.argument("spec", type=click.Path(dir_okay=False))
@click.argument("prompt", required=False)
@click.option("--prompts", "prompts_file", default=None,
              help="prompts file: .txt (one a line), .jsonl ({id, prompt}, {id, messages} or {id, prompt_token_ids}), or - for stdin")
@click.option("--output", "-o", default=None, type=click.Path(allow_dash=True),
              help="results as JSON lines (re-running resumes); - for standard output")
@click.option("--overwrite", is_flag=True, help="start the output afresh when it holds results of another spec, overrides "
              "or prompts (never for a file that is not a decodekit results file)")
@click.option("--format", "fmt", type=click.Choice(["txt", "jsonl"]), default=None, help="prompts file format (default: by extension)")
@click.option("--set", "sets", multiple=True, metavar="FIELD=VALUE", help="override a sampling field, e.g. --set temperature=0 (YAML value)")
@click.option("--progress/--no-progress", default=None, help="progress bar (default: when stderr is a terminal)")
@click.option("--ray", "use_ray", is_flag=True, help="run the prompts on a Ray cluster with Ray Data (needs the ray extra; "
              "--output may then be a directory: DIR/results.jsonl)")
@click.option("--ray-address", default=None, help="with --ray: the cluster to join ('auto': the one `ray start` runs here; "
              "default: start a local one)")
@click.option("--replicas", default=1, show_default=True, type=click.IntRange(min=1), help="with --ray: actors, each its own engine")
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1), help="with --ray: prompts per actor call")
@click.option("--cpus-per-actor", default=1.0, show_default=True, type=click.FloatRange(min=0), help="with --ray: CPUs each actor reserves")
@click.option("--gpus-per-actor", default=None, type=click.FloatRange(min=0),
              help="with --ray: GPUs each actor reserves (default: 1 when the cluster has GPUs and the spec's device is not cpu)")
@click.option("--all-candidates", is_flag=True, help="with a reranker: every candidate it ranked, best first with its "
              "score (records: a 'candidates' list), not only the n best")
def run_cmd(spec, prompt, prompts_file, output, overwrite, fmt, sets, progress, use_ray, ray_address, replicas, batch_size,
            cpus_per_actor, gpus_per_actor, all_candidates) -> int:
    """Run the pipeline SPEC on one PROMPT (streamed; with n > 1, each sample labelled) or on a
    file of prompts (--prompts; --ray: on a Ray cluster). Exits 1 when a request failed, 2 on bad input."""
    import yaml

    from framework.batch_run import open_results, read_prompts, run_records
    from framework.pipeline import Pipeline
    from framework.spec import load_spec

    overrides = {}
    for item in sets:
        key, sep, val = item.partition("=")
        if not sep or not key:
            raise click.UsageError(f"--set expects FIELD=VALUE, got {item!r}")
        overrides[key.strip()] = yaml.safe_load(val)
    if (prompt is None) == (prompts_file is None):
        raise click.UsageError("give either a PROMPT or --prompts FILE")
    if prompts_file is not None and output is None:
        raise click.UsageError("--prompts needs --output FILE.jsonl (or --output - for standard output)")
    if use_ray and prompts_file is None:
        raise click.UsageError("--ray needs --prompts FILE")
    loaded = load_spec(spec)  # all spec errors before any model loads
    records = read_prompts(prompts_file, fmt) if prompts_file is not None else None
    params = loaded.sampling_params(**overrides)  # bad overrides fail here too
    if use_ray:
        from framework.ray.batch import RayRunOptions, open_output, require_ray, run_ray

        require_ray()
        options = RayRunOptions(address=ray_address, replicas=replicas, batch_size=batch_size,
                                cpus_per_actor=cpus_per_actor, gpus_per_actor=gpus_per_actor)
        opened = open_output(loaded, records, output, params, overwrite=overwrite, all_candidates=all_candidates)
        summary = run_ray(loaded, records, opened, options, overrides=overrides, progress=progress,
                          all_candidates=all_candidates)
        for line in summary.lines():
            click.echo(line, err=True)
        return 1 if summary.failed else 0
    opened = None
    if records is not None:  # a bad --output is refused before the model loads
        opened = open_results(loaded, records, output, params, overwrite=overwrite, all_candidates=all_candidates)
    try:
        pipe = Pipeline(loaded)
    except BaseException:
        if opened is not None:
            opened[0].close()
        raise
    if records is None:
        return _run_one(pipe, prompt, params, overrides, all_candidates)
    summary = run_records(pipe, records, progress=progress, overrides=overrides, opened=opened,
                          all_candidates=all_candidates)
    for line in summary.lines():
        click.echo(line, err=True)
    return 1 if summary.failed else 0


def _run_one(pipe, prompt: str, params, overrides: dict, all_candidates: bool = False) -> int:
    """One prompt: streamed to the terminal; several samples (n > 1, beams) printed one after
    another, each under a label. A reranked request (which cannot stream) prints its n best, each
    with its score (``all_candidates``: every ranked candidate). An error starts on a line of
    its own."""
    count = max(params.n, params.num_return_sequences or 1)
    if count > 1 or params.reranker is not None or params.num_samples > 1:
        out = pipe.generate([prompt], use_tqdm=False, **overrides)[0]
        shown = out.candidates if all_candidates and out.candidates is not None else out.outputs
        for c in shown:
            extra = (f", {c.model}" if c.model is not None else "") + (f", score {c.score:.3f}" if c.score is not None else "")
            click.echo(f"--- sample {c.index + 1}/{len(shown)} ({c.finish_reason}{extra}) ---")
            click.echo(f"{prompt}{c.text}")
        return 0
    click.echo(prompt, nl=False)
    try:
        for delta in pipe.stream(prompt, **overrides):
            click.echo(delta, nl=False)
    finally:
        click.echo()  # the completion (or an error message after it) ends the line
    return 0


@cli.command("serve")
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True, help="address to bind (loopback by default)")
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--api-key", default=None, envvar="DECODEKIT_API_KEY", help="require 'Authorization: Bearer KEY' on /v1 (env DECODEKIT_API_KEY)")
@click.option("--model-name", default=None, help="the model id clients send (default: the spec's model)")
@click.option("--max-queue", default=256, show_default=True, type=click.IntRange(min=1), help="requests waiting for the batch before 429")
@click.option("--max-body-size", default="1MiB", show_default=True, help="largest request body (413 beyond)")
@click.option("--max-prompt-tokens", default=None, type=click.IntRange(min=1), help="longest prompt in tokens (413 beyond; default: the model's context)")
@click.option("--request-timeout", default=600.0, show_default=True, type=float, help="seconds before a request is aborted; 0 = none")
@click.option("--shutdown-timeout", default=30.0, show_default=True, type=float, help="seconds running requests get to finish at shutdown")
@click.option("--log-level", default="info", show_default=True, type=click.Choice(["critical", "error", "warning", "info", "debug"]))
@click.option("--ray", "use_ray", is_flag=True, help="serve behind a Ray Serve deployment (needs the ray extra)")
@click.option("--ray-address", default=None, help="with --ray: the cluster to join (default: start a local one)")
@click.option("--replicas", default=1, show_default=True, type=click.IntRange(min=1), help="with --ray: replicas, each its own engine")
@click.option("--cpus-per-replica", default=1.0, show_default=True, type=click.FloatRange(min=0), help="with --ray: CPUs each replica reserves")
@click.option("--gpus-per-replica", default=None, type=click.FloatRange(min=0),
              help="with --ray: GPUs each replica reserves (default: 1 when the cluster has GPUs and the spec's device is not cpu)")
def serve_cmd(spec, host, port, api_key, model_name, max_queue, max_body_size, max_prompt_tokens, request_timeout,
              shutdown_timeout, log_level, use_ray, ray_address, replicas, cpus_per_replica, gpus_per_replica) -> None:
    """Serve the pipeline SPEC over an OpenAI-compatible HTTP API (needs the [server] extra; with
    --ray, N replicas on Ray Serve)."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise DecodekitError("decodekit serve needs the server extra: pip install 'decodekit[server]'") from None
    from framework.config import parse_size
    from framework.pipeline import Pipeline
    from framework.server import ServerConfig, serve
    from framework.spec import load_spec

    try:
        body_limit = parse_size(max_body_size)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--max-body-size") from None
    if api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
        click.echo(f"warning: serving on {host} without --api-key: anyone who can reach it can use it", err=True)
    config = ServerConfig(
        host=host, port=port, api_key=api_key, model_name=model_name, max_queue=max_queue,
        max_body_bytes=body_limit, max_prompt_tokens=max_prompt_tokens,
        request_timeout=request_timeout or None, shutdown_timeout=shutdown_timeout, log_level=log_level,
    )
    if use_ray:
        from framework.ray.batch import require_ray

        require_ray()
        load_spec(spec)  # spec errors before any actor starts
        from framework.ray.serving import serve_ray

        serve_ray(spec, config, replicas=replicas, address=ray_address, cpus_per_replica=cpus_per_replica,
                  gpus_per_replica=gpus_per_replica)
        return
    pipe = Pipeline(load_spec(spec))  # spec errors before the model loads
    serve(pipe, config)


@cli.command("validate")
@click.argument("spec", type=click.Path(dir_okay=False))
def validate_cmd(spec) -> None:
    """Check SPEC completely without loading the model: structure, duplicate keys, plugin names and
    options, paths, then (with the model's tokenizer only) every processor's per-request checks and
    the compilation of its constraint."""
    from framework.pipeline import validate_pipeline

    loaded = validate_pipeline(spec)
    names = [p.name for p in loaded.processors]
    click.echo(f"{spec}: ok (model {loaded.spec.model}; processors: {', '.join(names) or 'none'}; "
               f"constraint: {loaded.constraint.name if loaded.constraint else 'none'})")


@cli.command("schema")
@click.option("--indent", default=2, show_default=True, type=int)
def schema_cmd(indent: int) -> None:
    """Print the JSON Schema of pipeline specs (for editor completion), with every plugin's options."""
    from framework.spec import spec_json_schema

    click.echo(json.dumps(spec_json_schema(), indent=indent))


def _add_plugin_commands() -> None:
    """Add the commands plugins register. A plugin that fails to load must not take the whole
    command line with it: ``--help`` and the built-in commands that need no plugin still work,
    and the error (naming the plugin) is shown — commands that need the plugins report it again."""
    from framework.plugins import get_plugin_manager

    try:
        pm = get_plugin_manager()
    except DecodekitError as exc:
        click.echo(f"warning: plugin commands are unavailable: {exc}", err=True)
        return
    for reg in pm.registry("command"):
        if reg.name in cli.commands:
            raise DecodekitError(f"plugin {reg.source!r} registers command {reg.name!r}, which is built in")
        cli.add_command(reg.factory, reg.name)


def main(argv: list[str] | None = None) -> int:
    try:
        _add_plugin_commands()
        rc = cli.main(args=argv, prog_name="decodekit", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except DecodekitError as exc:  # user errors: a message, never a traceback
        click.echo(f"error: {exc}", err=True)
        return 2
    return rc if isinstance(rc, int) else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
