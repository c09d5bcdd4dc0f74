"""spin-ray's Grafana dashboard as code: the panels and their PromQL (`panels`), laid out with
grafana-foundation-sdk (`build`); dashboards/spin-ray.json is its output."""
