from __future__ import annotations

import pytest

from crewguard.agents.tools import (
    TOOL_REGISTRY,
    UnknownToolError,
    allowed_tool_names,
    make_tool,
    tools_for,
)


def test_tools_answer_deterministically_without_io() -> None:
    kb = make_tool("search_knowledge_base")
    assert kb.run(query="I want a refund") == kb.run(query="I want a refund")
    assert kb.run(query="refund").startswith("KB-101")
    assert kb.run(query="zzz") == "no matching knowledge-base article"
    history = make_tool("lookup_sender_history")
    assert "enterprise" in history.run(sender="<bob@ACME.example>")
    assert history.run(sender="x@unknown.example") == "no support history on record for this sender"


def test_tool_schema_is_one_string_argument() -> None:
    for name, spec in TOOL_REGISTRY.items():
        schema = make_tool(name).args_schema.model_json_schema()
        assert schema["required"] == [spec.argument]
        assert schema["properties"][spec.argument]["type"] == "string"


def test_only_registered_and_allowed() -> None:
    assert allowed_tool_names(
        ["search_knowledge_base", "lookup_sender_history"], ["search_knowledge_base"]
    ) == ["search_knowledge_base"]
    assert tools_for(["search_knowledge_base"], []) == []
    with pytest.raises(UnknownToolError, match="delete_all_tickets"):
        allowed_tool_names(["delete_all_tickets"], ["delete_all_tickets"])
