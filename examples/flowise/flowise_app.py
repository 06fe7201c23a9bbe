"""Flowise's telemetry, written with waypost: the event catalogue as typed payloads.

Only the declared fields leave: a flow's graph is reduced to node ids and edges, and node
inputs and outputs, messages, credentials and variables have no field to travel in.
``DISABLE_FLOWISE_TELEMETRY=true`` turns it all off.

Run it: ``python examples/flowise/flowise_app.py``; see what is collected:
``PYTHONPATH=examples/flowise waypost --config examples/flowise/telemetry.yml manifest``.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any, Literal

import waypost
from pydantic import BaseModel, Field

HERE = Path(__file__).parent
VERSION = "2.2.0"


class Edge(BaseModel):
    source: str = Field(description="Id of the node the edge leaves.")
    target: str = Field(description="Id of the node the edge enters.")


class FlowGraph(BaseModel):
    """A flow's shape: which nodes, how they connect. Nothing from inside a node."""

    nodes: list[str] = Field(description="Node ids, e.g. chatOpenAI_0.")
    edges: list[Edge] = Field(description="Connections between nodes.")


class ChatflowCreated(waypost.Payload, event="chatflow_created"):
    """A chatflow was created."""

    version: str = Field(description="Flowise version.")
    chatflow_id: str = Field(serialization_alias="chatlowId", description="Chatflow id.")
    flow_graph: FlowGraph = Field(serialization_alias="flowGraph", description="Nodes and edges.")


class ToolCreated(waypost.Payload, event="tool_created"):
    """A custom tool was created."""

    version: str = Field(description="Flowise version.")
    tool_id: str = Field(serialization_alias="toolId", description="Tool id.")
    tool_name: str = Field(serialization_alias="toolName", description="Tool name.")


class AssistantCreated(waypost.Payload, event="assistant_created"):
    """An assistant was created."""

    version: str = Field(description="Flowise version.")
    assistant_id: str = Field(serialization_alias="assistantId", description="Assistant id.")


class VectorUpserted(waypost.Payload, event="vector_upserted"):
    """Documents were upserted into a vector store."""

    version: str = Field(description="Flowise version.")
    chatflow_id: str = Field(serialization_alias="chatlowId", description="Chatflow id.")
    type: Literal["INTERNAL", "EXTERNAL"] = Field(description="From the UI or through the API.")
    flow_graph: FlowGraph = Field(serialization_alias="flowGraph", description="Nodes and edges.")
    stop_node_id: str = Field(serialization_alias="stopNodeId", description="Upserting node.")


class PredictionSent(waypost.Payload, event="prediction_sent"):
    """A prediction was made (a message was answered); the message itself is not sent."""

    version: str = Field(description="Flowise version.")
    chatflow_id: str = Field(serialization_alias="chatlowId", description="Chatflow id.")
    chat_id: str = Field(serialization_alias="chatId", description="Chat session id.")
    type: Literal["INTERNAL", "EXTERNAL"] = Field(description="From the UI or through the API.")
    flow_graph: FlowGraph = Field(serialization_alias="flowGraph", description="Nodes and edges.")


def graph(flow: dict[str, Any]) -> FlowGraph:
    """The telemetry view of a flow: ids and edges only, whatever the nodes hold."""
    return FlowGraph(
        nodes=[n["id"] for n in flow["nodes"]],
        edges=[Edge(source=e["source"], target=e["target"]) for e in flow["edges"]],
    )


class Flowise:
    """The server side of Flowise, as far as telemetry sees it."""

    def __init__(self, config: Path | str = HERE / "telemetry.yml", **kwargs: Any) -> None:
        self.telemetry = waypost.Telemetry(app="flowise", version=VERSION, config=config, **kwargs)
        self.flows: dict[str, dict[str, Any]] = {}

    def create_chatflow(self, flow: dict[str, Any]) -> str:
        flow_id = str(uuid.uuid4())
        self.flows[flow_id] = flow
        self.telemetry.track(
            ChatflowCreated(version=VERSION, chatflow_id=flow_id, flow_graph=graph(flow))
        )
        return flow_id

    def create_tool(self, name: str, code: str) -> str:
        tool_id = str(uuid.uuid4())
        self.telemetry.track(ToolCreated(version=VERSION, tool_id=tool_id, tool_name=name))
        return tool_id

    def create_assistant(self, instructions: str) -> str:
        assistant_id = str(uuid.uuid4())
        self.telemetry.track(AssistantCreated(version=VERSION, assistant_id=assistant_id))
        return assistant_id

    def upsert(self, flow_id: str, stop_node_id: str, *, external: bool = False) -> None:
        self.telemetry.track(
            VectorUpserted(
                version=VERSION,
                chatflow_id=flow_id,
                type="EXTERNAL" if external else "INTERNAL",
                flow_graph=graph(self.flows[flow_id]),
                stop_node_id=stop_node_id,
            )
        )

    def predict(self, flow_id: str, chat_id: str, question: str, *, external: bool = False) -> str:
        answer = f"echo: {question}"
        self.telemetry.track(
            PredictionSent(
                version=VERSION,
                chatflow_id=flow_id,
                chat_id=chat_id,
                type="EXTERNAL" if external else "INTERNAL",
                flow_graph=graph(self.flows[flow_id]),
            )
        )
        return answer


EXAMPLE_FLOW = {
    "nodes": [
        {"id": "chatOpenAI_0", "data": {"inputs": {"modelName": "gpt-4o", "temperature": 0.2}}},
        {"id": "bufferMemory_0", "data": {"inputs": {"sessionId": "s-1"}}},
        {"id": "conversationChain_0", "data": {"inputs": {"systemMessage": "Be brief."}}},
    ],
    "edges": [
        {"source": "chatOpenAI_0", "target": "conversationChain_0"},
        {"source": "bufferMemory_0", "target": "conversationChain_0"},
    ],
}


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.INFO)
    app = Flowise(debug=True)  # debug: print what would be sent, send nothing
    flow = app.create_chatflow(EXAMPLE_FLOW)
    app.predict(flow, "chat-1", "What is Flowise?")
    app.telemetry.shutdown()
