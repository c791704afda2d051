from dmqn_cli.main import app

app(prog_name="dmqn")
