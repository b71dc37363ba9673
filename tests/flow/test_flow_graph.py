"""The triage graph's shape: every run ends, and every LLM failure has somewhere to go."""

from __future__ import annotations

from crewguard.crew.flow import triage

NODES = {
    triage.CLASSIFY_LLM,
    triage.CLASSIFY_KEYWORDS,
    triage.CREATE_TICKET,
    triage.REVIEW_UNCLASSIFIED,
    triage.REVIEW_TICKET_FAILED,
    triage.REVIEW_UNPARSEABLE,
}


def successors(node: str) -> set[str]:
    return {target for (source, _), target in triage.EDGES.items() if source == node}


def test_edges_join_known_nodes() -> None:
    for (source, outcome), target in triage.EDGES.items():
        assert source in NODES, source
        assert target in NODES | {triage.END}, (source, outcome, target)
    assert {source for source, _ in triage.EDGES} == NODES  # no node without a way out


def test_the_graph_has_no_cycle_so_every_run_ends() -> None:
    def visit(node: str, path: tuple[str, ...]) -> None:
        assert node not in path, f"cycle: {' -> '.join((*path, node))}"
        for nxt in successors(node) - {triage.END}:
            visit(nxt, (*path, node))

    for node in NODES:
        visit(node, ())


def test_llm_failure_falls_back_to_keywords_then_review() -> None:
    edges = triage.EDGES
    assert edges[(triage.CLASSIFY_LLM, "failed")] == triage.CLASSIFY_KEYWORDS
    assert edges[(triage.CLASSIFY_KEYWORDS, "unsure")] == triage.REVIEW_UNCLASSIFIED
    assert edges[(triage.CREATE_TICKET, "failed")] == triage.REVIEW_TICKET_FAILED
    # every review node is terminal: a human takes it from there
    for review in (triage.REVIEW_UNCLASSIFIED, triage.REVIEW_TICKET_FAILED, triage.REVIEW_UNPARSEABLE):
        assert successors(review) == {triage.END}
