"""The panels of the live page, one class per panel; each owns its Bokeh models and their update
(see :mod:`dashboards.panels.base`). :class:`dashboards.layout.DashboardSession` composes them."""
