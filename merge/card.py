"""Model card (``README.md``) written next to every merged checkpoint.

Layout (Hugging Face model card conventions, as mergekit writes them, plus what exact
reproduction needs):

* YAML front matter: ``base_model`` (the Hub ids of the base and of every merged model, base
  first; local paths are left out since the Hub only accepts repo ids there),
  ``base_model_relation: merge``, ``library_name``, ``tags: [merge, weightsmith]``, and a
  ``weightsmith`` block with the method and, per input model, its reference, Hub id, requested
  revision and **resolved commit sha**;
* the method and its paper (``method.paper``, ``method.url``);
* the input models with their revisions and commits;
* the recipe as given, and the same recipe with every Hub model pinned to its resolved commit
  (``org/name@<sha>``): merging that recipe again gives byte-identical shards.

The card is a pure function of its inputs (no dates, no host names), so re-running a pinned
merge reproduces the README too.
"""

from __future__ import annotations

from typing import Any

import yaml

from merge.checkpoint import ResolvedModel

#: Recipe keys whose string values are model references.
_REF_KEYS = {"model", "base_model", "tokenizer_source", "source"}


def _label(m: ResolvedModel) -> str:
    return m.repo_id if m.repo_id else m.ref


def _md(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _pins(models: list[ResolvedModel]) -> dict[str, str]:
    """Reference as written -> ``repo_id@commit`` for every Hub model with a resolved commit."""
    return {m.ref: f"{m.repo_id}@{m.commit}" for m in models if m.repo_id and m.commit}


def pin_recipe(recipe_yaml: str, models: list[ResolvedModel]) -> str | None:
    """The recipe with every Hub reference replaced by ``repo_id@commit`` (None if it cannot be parsed)."""
    pins = _pins(models)
    try:
        data = yaml.safe_load(recipe_yaml)
    except yaml.YAMLError:
        return None
    if not isinstance(data, dict):
        return None

    def walk(node: Any, key: str | None = None) -> Any:
        if isinstance(node, dict):
            return {k: walk(v, k) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v, key) for v in node]
        if isinstance(node, str) and key in _REF_KEYS:
            return pins.get(node, node)
        return node

    return yaml.safe_dump(walk(data), sort_keys=False)


def _front_matter(method: Any, inputs: list[tuple[str, ResolvedModel]]) -> str:
    hub_ids = list(dict.fromkeys(m.repo_id for _, m in inputs if m.repo_id))
    front: dict[str, Any] = {}
    if hub_ids:
        front["base_model"] = hub_ids
        front["base_model_relation"] = "merge"
    front["library_name"] = "transformers"
    front["tags"] = ["merge", "weightsmith"]
    front["weightsmith"] = {
        "method": getattr(method, "name", str(method)),
        "models": [
            {
                k: v
                for k, v in (
                    ("role", role),
                    ("ref", m.ref),
                    ("repo_id", m.repo_id),
                    ("revision", m.revision),
                    ("commit", m.commit),
                )
                if v is not None
            }
            for role, m in inputs
        ],
    }
    return yaml.safe_dump(front, sort_keys=False, allow_unicode=True).strip()


def render_model_card(
    recipe_yaml: str, method: Any, models: list[ResolvedModel], base: ResolvedModel | None
) -> str:
    """Render README.md for a merge of ``models`` onto ``base`` with ``method`` (a MethodSpec).

    ``recipe_yaml`` is the recipe as the engine normalised it (``Recipe.to_yaml()``).
    """
    inputs: list[tuple[str, ResolvedModel]] = ([("base", base)] if base is not None else []) + [
        ("merged", m) for m in models if base is None or m.ref != base.ref
    ]
    name = getattr(method, "name", str(method))
    paper = getattr(method, "paper", "") or ""
    url = getattr(method, "url", "") or ""
    summary = getattr(method, "summary", "") or ""
    try:
        title = (yaml.safe_load(recipe_yaml) or {}).get("name") or "Merged model"
    except (yaml.YAMLError, AttributeError):
        title = "Merged model"

    lines = ["---", _front_matter(method, inputs), "---", "", f"# {title}", ""]
    n = len(inputs)
    with_base = f" (base model: `{_label(base)}`)" if base is not None else ""
    lines += [
        f"This model is a merge of {n} model{'s' if n != 1 else ''}{with_base}, made with "
        f"weightsmith using the **{name}** method.",
        "",
    ]

    lines += ["## Method", "", f"**{name}**" + (f": {summary}" if summary else ""), ""]
    if paper or url:
        lines += [f"Paper: {f'[{paper}]({url})' if paper and url else (paper or url)}", ""]

    lines += ["## Models", "", "| role | model | revision | commit |", "|---|---|---|---|"]
    for role, m in inputs:
        model = (
            f"[{m.repo_id}](https://huggingface.co/{m.repo_id})" if m.repo_id else f"`{_md(m.ref)}` (local)"
        )
        lines.append(
            f"| {role} | {model} | {_md(m.revision or '-')} | {f'`{m.commit}`' if m.commit else '-'} |"
        )
    lines.append("")

    lines += ["## Recipe", "", "```yaml", recipe_yaml.strip(), "```", ""]

    pinned = pin_recipe(recipe_yaml, [m for _, m in inputs])
    local = [m.ref for _, m in inputs if not m.repo_id]
    lines += ["## Reproduce", ""]
    if pinned is not None and _pins([m for _, m in inputs]):
        lines += [
            "The same recipe with every Hub model pinned to the commit that was merged; "
            "`weightsmith merge pinned.yml -o OUT` rebuilds byte-identical weights:",
            "",
            "```yaml",
            pinned.strip(),
            "```",
            "",
        ]
    else:
        lines += ["`weightsmith merge recipe.yml -o OUT` with the recipe above.", ""]
    if local:
        lines += [
            "Local inputs (not on the Hub, so not pinned here): "
            + ", ".join(f"`{_md(r)}`" for r in local)
            + ".",
            "",
        ]
    return "\n".join(lines)


__all__ = ["pin_recipe", "render_model_card"]
