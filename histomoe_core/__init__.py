"""HistoMoE core package."""
