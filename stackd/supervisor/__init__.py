"""The asyncio (anyio) orchestration of a stack: dependency order, runners, restarts, health, logs."""
