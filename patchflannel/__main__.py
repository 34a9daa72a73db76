from patchflannel.cli import app

app(prog_name="patchflannel")
