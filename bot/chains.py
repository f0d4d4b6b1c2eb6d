"""The networks the bot pays on, with their USDC contract and EIP-712 domain.

The domain is always taken from this table, never from a server's payment requirements.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from urllib.parse import urlsplit


@dataclass(frozen=True)
class Chain:
    """One EVM network and its USDC token."""

    caip2: str
    v1_name: str
    chain_id: int
    usdc: str
    token_name: str
    token_version: str


BASE = Chain(
    caip2="eip155:8453",
    v1_name="base",
    chain_id=8453,
    usdc="0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913",
    token_name="USD Coin",
    token_version="2",
)
BASE_SEPOLIA = Chain(
    caip2="eip155:84532",
    v1_name="base-sepolia",
    chain_id=84532,
    usdc="0x036CbD53842c5426634e7929541eC2318f3dCF7e",
    token_name="USDC",
    token_version="2",
)

CHAINS: tuple[Chain, ...] = (BASE, BASE_SEPOLIA)


def chain_for(network: str) -> Chain | None:
    """The chain a requirement names, by CAIP-2 id (v2) or plain name (v1)."""
    for chain in CHAINS:
        if network in (chain.caip2, chain.v1_name):
            return chain
    return None


_TESTNET_HOST = re.compile(r"(^|[.-])(testnet|sepolia)([.-]|$)")


def gateway_chain(api_url: str) -> Chain:
    """The network a gateway's address implies: Base Sepolia for a testnet host (such as
    testnet.blockrun.ai) or one on loopback (the sandbox), else Base mainnet."""
    host = (urlsplit(api_url).hostname or "").lower()
    if host == "localhost" or host.endswith(".localhost") or _TESTNET_HOST.search(host):
        return BASE_SEPOLIA
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    return BASE_SEPOLIA if loopback else BASE
