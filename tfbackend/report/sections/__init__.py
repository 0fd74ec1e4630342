"""Console renderers for report sections, one module per section name (render(data, console))."""
