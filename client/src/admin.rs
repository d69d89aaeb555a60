//! The admin face, typed.

use saferchat_proto::admin::{self as pb, admin_client::AdminClient};
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;

use crate::connect::connect;
use crate::error::ClientError;

/// An admin connection: every call carries the bearer token.
#[derive(Debug, Clone)]
pub struct Admin {
    client: AdminClient<Channel>,
    authorization: MetadataValue<tonic::metadata::Ascii>,
}

impl Admin {
    /// Connects to a node with an admin token.
    ///
    /// # Errors
    /// When the node is unreachable or the token is not header-safe.
    pub async fn connect(address: &str, token: &str) -> Result<Admin, ClientError> {
        let authorization = format!("Bearer {}", token.trim()).parse().map_err(|_| {
            ClientError::Input("the admin token contains characters not allowed in a header".into())
        })?;
        Ok(Admin {
            client: AdminClient::new(connect(address).await?),
            authorization,
        })
    }

    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request
            .metadata_mut()
            .insert("authorization", self.authorization.clone());
        request
    }

    /// Creates a room.
    ///
    /// # Errors
    /// ALREADY_EXISTS, INVALID_ARGUMENT, UNAUTHENTICATED, …
    pub async fn create_chat(&mut self, chat: &str) -> Result<pb::ChatReply, ClientError> {
        let request = self.request(pb::AddChatRequest {
            chat: chat.to_owned(),
            op: pb::ChatOp::Create.into(),
        });
        Ok(self.client.add_chat(request).await?.into_inner())
    }

    /// Adds a member.
    ///
    /// # Errors
    /// NOT_FOUND for an unknown room, INVALID_ARGUMENT for a bad handle, …
    pub async fn add_user(
        &mut self,
        chat: &str,
        user: &str,
        expected_revision: Option<u64>,
    ) -> Result<pb::ChatReply, ClientError> {
        let request = self.request(pb::AddUserRequest {
            chat: chat.to_owned(),
            op: pb::UserOp::Add.into(),
            user: user.to_owned(),
            expected_revision,
        });
        Ok(self.client.add_user(request).await?.into_inner())
    }

    /// Removes a member.
    ///
    /// # Errors
    /// NOT_FOUND for an unknown room or a non-member, …
    pub async fn remove_user(
        &mut self,
        chat: &str,
        user: &str,
        expected_revision: Option<u64>,
    ) -> Result<pb::ChatReply, ClientError> {
        let request = self.request(pb::RmUserRequest {
            chat: chat.to_owned(),
            user: user.to_owned(),
            expected_revision,
        });
        Ok(self.client.rm_user(request).await?.into_inner())
    }

    /// The cluster map as the node applied it, and its map group's state.
    ///
    /// # Errors
    /// UNAUTHENTICATED, UNAVAILABLE, …
    pub async fn cluster_status(&mut self) -> Result<pb::ClusterStatusReply, ClientError> {
        let request = self.request(pb::ClusterStatusRequest {});
        Ok(self.client.cluster_status(request).await?.into_inner())
    }

    /// Adds a node to the cluster map as joining.
    ///
    /// # Errors
    /// FAILED_PRECONDITION when the id is taken, INVALID_ARGUMENT for a bad
    /// datacenter or address, UNAVAILABLE without a map leader, …
    pub async fn add_node(
        &mut self,
        node: pb::AddNodeRequest,
    ) -> Result<pb::MapChangeReply, ClientError> {
        let request = self.request(node);
        Ok(self.client.add_node(request).await?.into_inner())
    }

    /// Removes a node that holds no replica slot from the cluster map.
    ///
    /// # Errors
    /// FAILED_PRECONDITION for a node that holds slots or is unknown, …
    pub async fn remove_node(&mut self, id: u64) -> Result<pb::MapChangeReply, ClientError> {
        let request = self.request(pb::RemoveNodeRequest { id });
        Ok(self.client.remove_node(request).await?.into_inner())
    }

    /// Makes every joining node active; partitions then move to them.
    ///
    /// # Errors
    /// FAILED_PRECONDITION when the cluster map is not created, …
    pub async fn rebalance(&mut self) -> Result<pb::MapChangeReply, ClientError> {
        let request = self.request(pb::RebalanceRequest {});
        Ok(self.client.rebalance(request).await?.into_inner())
    }

    /// Makes an active node draining; its partitions then move off it.
    ///
    /// # Errors
    /// FAILED_PRECONDITION for a node that is not active, …
    pub async fn drain(&mut self, id: u64) -> Result<pb::MapChangeReply, ClientError> {
        let request = self.request(pb::DrainRequest { id });
        Ok(self.client.drain(request).await?.into_inner())
    }

    /// Moves the home of every partition homed in `from` (or of
    /// `partitions`) to `to`.
    ///
    /// # Errors
    /// FAILED_PRECONDITION when no partition could move, …
    pub async fn move_homes(
        &mut self,
        from: &str,
        to: &str,
        partitions: Vec<u32>,
    ) -> Result<pb::MoveHomesReply, ClientError> {
        let request = self.request(pb::MoveHomesRequest {
            from: from.to_owned(),
            to: to.to_owned(),
            partitions,
        });
        Ok(self.client.move_homes(request).await?.into_inner())
    }

    /// The membership, revision and lease holders of a room.
    ///
    /// # Errors
    /// NOT_FOUND for an unknown room, …
    pub async fn members(&mut self, chat: &str) -> Result<pb::MembersReply, ClientError> {
        let request = self.request(pb::MembersRequest {
            chat: chat.to_owned(),
        });
        Ok(self.client.members(request).await?.into_inner())
    }

    /// Every room, following pages.
    ///
    /// # Errors
    /// UNAUTHENTICATED, UNAVAILABLE, …
    pub async fn list_chats(&mut self) -> Result<Vec<pb::ChatSummary>, ClientError> {
        let mut all = Vec::new();
        let mut after = String::new();
        loop {
            let request = self.request(pb::ListChatsRequest {
                after: after.clone(),
                limit: 1000,
            });
            let page = self.client.list_chats(request).await?.into_inner();
            all.extend(page.chats);
            if page.next_after.is_empty() {
                return Ok(all);
            }
            after = page.next_after;
        }
    }
}
