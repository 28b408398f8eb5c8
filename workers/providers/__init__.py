"""Model providers, one module each; :func:`build_provider` picks one by ``Provider.kind``.

Modules are imported only when a replica uses them, so a fake-only fleet never imports the SDKs.
"""

from __future__ import annotations

import importlib

from agentpool.shared.config import AgentType
from agentpool.shared.config import Provider as ProviderConfig
from agentpool.workers.providers.base import Provider

_MODULES = {
    "fake": "agentpool.workers.providers.fake:FakeProvider",
    "anthropic": "agentpool.workers.providers.anthropic:AnthropicProvider",
    "openai": "agentpool.workers.providers.openai:OpenAIProvider",
}


def build_provider(config: ProviderConfig, agent_type: AgentType) -> Provider:
    module, _, cls = _MODULES[config.kind].partition(":")
    provider_cls: type[Provider] = getattr(importlib.import_module(module), cls)
    return provider_cls(config, agent_type)


def preload(kind: str) -> None:
    """Import the module of a provider kind now (what a standby replica does ahead of need)."""
    importlib.import_module(_MODULES[kind].partition(":")[0])
