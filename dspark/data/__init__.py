"""Data formats shared by evaluation, training and serving: prompt / conversation files (`samples`) and
chat rendering (`chat`)."""
