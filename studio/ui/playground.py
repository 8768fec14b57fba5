"""The Playground tab: one prompt, the base model's answer beside those of chosen runs.

The models live in the playground's model process (studio.engine, role ``playground``),
never in the web process: it keeps the last few it loaded, so trying prompt after prompt
loads each model once, and it exits, freeing them, after a few quiet minutes.
"""
from __future__ import annotations

import html
from typing import Any, Callable

import gradio as gr

from adapters.core.errors import StudioError
from studio.engine import engine
from studio.ui.common import (Studio, completed_run, describe_failure, for_api, job_choices, message_html,
                              parse_ids, progress_reporter, want_bool, want_float, want_int, want_text)

# Caps on one request: the prompt and the answer both cost memory and minutes of CPU.
PROMPT_LIMIT, MAX_NEW_TOKENS, MAX_TEMPERATURE, MAX_RUNS = 8000, 1024, 5.0, 8


def generate(studio: Studio, prompt: str, job_ids: list, include_base: bool = True, base_model: str = "",
             max_new_tokens: int = 64, temperature: float = 0.0,
             progress: Callable[[dict], Any] | None = None) -> list[dict]:
    prompt = want_text(prompt, "prompt", PROMPT_LIMIT)
    if not prompt.strip():
        raise StudioError("the prompt is empty.", "prompt", "type a prompt.")
    max_new_tokens = want_int(max_new_tokens, "max_new_tokens", 1, MAX_NEW_TOKENS)
    temperature = want_float(temperature, "temperature", 0.0, MAX_TEMPERATURE)
    include_base = want_bool(include_base, "include_base")
    base_model = want_text(base_model, "base_model", 4096).strip()
    ids = parse_ids(job_ids)
    if len(ids) > MAX_RUNS:
        raise StudioError(f"{len(ids)} runs chosen.", "runs", f"choose at most {MAX_RUNS}.")
    jobs = [completed_run(studio, jid, "generate") for jid in ids]
    targets = []
    if include_base:
        base = studio.policy.model(base_model, "base_model") if base_model else (
            jobs[0].spec["model"] if jobs else studio.default_model)
        targets.append([f"base: {base}", base])
    targets += [[f"#{j.id} {j.name}", j.run_dir] for j in jobs]
    if not targets:
        raise StudioError("nothing to generate with.", "runs", "choose runs, or include the base model.")
    return engine(studio.home, "playground").call("generate", progress, targets=targets, prompt=prompt,
                                                  max_new_tokens=int(max_new_tokens), temperature=float(temperature))


def cards_html(results: list[dict]) -> str:
    cards = "".join(f'<div class="gen-card"><div class="gen-label">{html.escape(r["label"])}</div>'
                    f'<pre class="gen-text">{html.escape(r["output"]) or "<i>(empty)</i>"}</pre>'
                    f'<div class="gen-time">{r["seconds"]:.1f} s</div></div>' for r in results)
    return f'<div class="gen-grid">{cards}</div>'


def build(studio: Studio) -> dict:
    prompt = gr.Textbox(label="Prompt", lines=3, elem_id="playground.prompt",
                        placeholder="Spell out this date.\n\n2024-03-15")
    with gr.Row(equal_height=True):
        runs = gr.Dropdown(label="Runs", choices=[], value=[], multiselect=True, scale=3, elem_id="playground.runs")
        base = gr.Textbox(label="Base model", placeholder="default: the first run's base model", max_lines=1,
                          scale=2, elem_id="playground.base_model")
        include_base = gr.Checkbox(label="include the base model", value=True, scale=1,
                                   elem_id="playground.include_base")
    with gr.Row(equal_height=False, elem_classes=["studio-actions"]):
        max_new = gr.Number(label="max_new_tokens", value=64, precision=0, elem_id="playground.max_new_tokens")
        temperature = gr.Number(label="temperature (0: greedy)", value=0.0, elem_id="playground.temperature")
        go = gr.Button("Generate", variant="primary", elem_id="playground.generate")
    note = gr.HTML(elem_id="playground.status")
    shown = gr.HTML(elem_id="playground.outputs")

    def on_generate(text, chosen, base_ref, with_base, n, temp, progress=gr.Progress()):
        try:
            results = generate(studio, text, chosen or [], with_base, base_ref, n or 64, temp or 0.0,
                               progress_reporter(progress))
        except Exception as e:
            return message_html(describe_failure(e), "error"), gr.skip()
        return "", cards_html(results)

    go.click(on_generate, [prompt, runs, base, include_base, max_new, temperature], [note, shown],
             api_visibility="private")
    return {"choice": runs, "choices": lambda: job_choices(studio, completed_only=True)}


def register_api(studio: Studio) -> None:
    @for_api
    def generate_side_by_side(prompt: str, job_ids: list[int], include_base: bool = True, base_model: str = "",
                              max_new_tokens: int = 64, temperature: float = 0.0) -> list[dict]:
        """Generations for one prompt from the base model and from each chosen completed run."""
        return generate(studio, prompt, job_ids, include_base, base_model, max_new_tokens, temperature)

    gr.api(generate_side_by_side, api_name="generate")
