//! Bearer-token authentication with roles. Every handler asks for the role it needs;
//! the answer is the caller's name (for logs and the audit trail) or a gRPC status.

use super::config::{Role, TokenConfig};
use std::collections::HashMap;
use tonic::{Request, Status};

/// Who is calling.
#[derive(Clone, Debug)]
pub struct Caller {
    pub name: String,
    roles: Vec<Role>,
}

impl Caller {
    fn may(&self, role: Role) -> bool {
        self.roles.contains(&Role::Admin) || self.roles.contains(&role)
    }
}

/// The token table.
pub struct Auth {
    tokens: HashMap<String, Caller>,
}

impl Auth {
    /// From the configured tokens; none configured means authentication is off.
    pub fn new(tokens: &[TokenConfig]) -> Auth {
        Auth {
            tokens: tokens
                .iter()
                .map(|t| {
                    (
                        t.token.clone(),
                        Caller {
                            name: t.name.clone(),
                            roles: t.roles.clone(),
                        },
                    )
                })
                .collect(),
        }
    }

    /// Whether tokens are required.
    pub fn enabled(&self) -> bool {
        !self.tokens.is_empty()
    }

    /// The name behind a valid token, whatever its roles (for auditing a denied call).
    pub fn name_of<T>(&self, request: &Request<T>) -> Option<String> {
        let token = request
            .metadata()
            .get("authorization")?
            .to_str()
            .ok()?
            .strip_prefix("Bearer ")?;
        self.tokens.get(token.trim()).map(|c| c.name.clone())
    }

    /// The caller of `request` if it may act in `role`: UNAUTHENTICATED without a valid
    /// token, PERMISSION_DENIED with a valid token that lacks the role.
    pub fn check<T>(&self, request: &Request<T>, role: Role) -> Result<Caller, Status> {
        if !self.enabled() {
            return Ok(Caller {
                name: "anonymous".into(),
                roles: vec![Role::Admin],
            });
        }
        let header = request
            .metadata()
            .get("authorization")
            .ok_or_else(|| Status::unauthenticated("missing authorization: Bearer <token>"))?;
        let token = header
            .to_str()
            .ok()
            .and_then(|h| h.strip_prefix("Bearer "))
            .ok_or_else(|| Status::unauthenticated("authorization must be: Bearer <token>"))?;
        let caller = self
            .tokens
            .get(token.trim())
            .ok_or_else(|| Status::unauthenticated("unknown bearer token"))?;
        if !caller.may(role) {
            return Err(Status::permission_denied(format!(
                "{} may not do this: the {role:?} role is needed",
                caller.name
            )));
        }
        Ok(caller.clone())
    }
}
